"""The KD training step, eager or compiled into one graph.

One step: pad-crop + flip of the device batch, normalisation, teacher and student forwards, KDCI, the loss,
backward, the optimizer update and the epoch's loss sums. `KDStep(compiled=True)` runs all of it as one
`torch.compile(fullgraph=True)` graph with static shapes (replayed as a CUDA graph on CUDA); with
`compiled=False` it is the eager `kd_step` below, which data-parallel (DDP) runs and fp16 always use.

What the compiled graph cannot take, it is given as device tensors made outside it: the crop offsets and
flip mask (drawn from the epoch's generator exactly as the eager step draws them, so the two paths see
the same batches and resume the same way) and the learning rate (a device table of the schedule indexed by
a device step counter: no host value enters the graph per step). The update itself is written here (SGD
with momentum/Nesterov, Adam, AdamW: torch's formulas) because dynamo will not trace `Optimizer.step` and
`zero_grad` into a full graph; it reads and writes the optimizers' own state tensors, created up front, so
checkpoints are the same either way and a run may switch between compiled and eager when it resumes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..data import apply_crop_flip, draw_crop_flip
from ..kdci import Distiller, attention_entropy, total_loss
from . import parallel
from .runtime import Runtime

log = logging.getLogger(__name__)


def kd_step(distiller: Distiller, optimizer: torch.optim.Optimizer, x: torch.Tensor, runtime: Runtime, scaler=None, extra_optimizers=()):
    """One eager KD optimisation step on a prepared batch; returns (DistillOutput, total loss). No host sync
    (except fp16 loss scaling's inf check, which needs one). `extra_optimizers` step too (parameters a
    method's loss trains next to the student; under data parallelism their gradients are averaged over
    ranks here, as DDP does for the distiller's own). `distiller` may be DDP-wrapped."""
    optimizers = [optimizer, *extra_optimizers]
    with runtime.autocast():
        out = distiller(x)
        loss = total_loss(out.losses)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    extra_params = [p for opt in extra_optimizers for group in opt.param_groups for p in group["params"]]
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        parallel.average_gradients(extra_params)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        parallel.average_gradients(extra_params)
        for opt in optimizers:
            opt.step()
    return out, loss


def kd_teacher(teacher: nn.Module, runtime: Runtime) -> nn.Module:
    """The teacher that KD forwards run: held once in the compute precision. Autocast caches its casts only for
    weights that need grad, so a frozen fp32 teacher would have every weight cast to bf16 again on every
    forward. Synthesis keeps the fp32 teacher (its BN-statistics hooks and input gradients want it)."""
    if runtime.amp_dtype != torch.bfloat16:  # fp32 runs, and fp16 (its loss scaling wants fp32 weights around)
        return teacher
    import copy

    return copy.deepcopy(teacher).to(torch.bfloat16).eval().requires_grad_(False)


def resolve_compile(setting: str, runtime: Runtime, world: int) -> bool:
    """`compile: auto | on | off` for this run. auto: on for single-process CUDA runs in bf16/fp32. fp16's loss
    scaling checks for infinities on the host every step, so it never compiles; data-parallel runs keep the
    eager step (DDP's gradient hooks fire between backward and the update that the graph would fuse)."""
    if setting == "off":
        return False
    if runtime.amp_dtype == torch.float16:
        if setting == "on":
            raise ValueError("compile = on cannot run with precision = fp16 (its loss scaling syncs with the host every step): "
                             "use precision bf16 or fp32, or compile off")
        return False
    if world > 1:
        if setting == "on":
            log.warning("compile = on: data-parallel ranks run the eager step (DDP synchronises gradients between backward "
                        "and the update); single-process runs compile")
        return False
    return setting == "on" or runtime.device.type == "cuda"


class KDStep:
    """The loop's KD step with the epoch's on-device loss sums.

    `start_epoch()`, then `step(pixels, generator)` per uint8 batch, then `totals()`: one device vector
    `[loss, attention entropy, *loss terms]` summed over the epoch's steps, named by `names`. The scheduler
    is stepped here after every update (its state stays the truth that checkpoints carry)."""

    def __init__(self, distiller: Distiller, train_module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 normalize: nn.Module, runtime: Runtime, *, num_classes: int, total_steps: int, padding: int, hflip: bool,
                 compiled: bool = False, extra_optimizers=(), scaler=None, mode: str | None = "auto"):
        self.distiller, self.train_module, self.normalize, self.runtime = distiller, train_module, normalize, runtime
        self.optimizers = [optimizer, *extra_optimizers]
        self.optimizer, self.extra_optimizers, self.scheduler, self.scaler = optimizer, list(extra_optimizers), scheduler, scaler
        self.padding, self.hflip, self.compiled = padding, hflip, compiled
        device = runtime.device
        self.names = loss_names(distiller, num_classes, device)
        self.sums = torch.zeros(2 + len(self.names), device=device)
        self.images = 0
        self._fn = None
        if compiled:
            for opt in self.optimizers:
                check_compilable(opt)
                create_state(opt)
            for p in self._params():
                p.grad = None
            optimizer._opt_called = True  # stepped in the graph, not by .step(): the scheduler's order check is moot
            # The learning rate of every step, per optimizer and group, on the device; the scheduler's own
            # state (last_epoch) says where a resumed run is.
            self.counter = torch.zeros((), dtype=torch.long, device=device)
            self.plans = [update_plan(opt) for opt in self.optimizers]
            self.lr_tables = [lr_table(opt, scheduler if opt is optimizer else None, total_steps, device) for opt in self.optimizers]
            if device.type == "cuda":  # captured graphs read these at fixed addresses
                for t in [self.counter, self.sums, *self.lr_tables, *(s for opt in self.optimizers for st in opt.state.values() for s in st.values())]:
                    torch._dynamo.mark_static_address(t)
            enable_backward_tracing()
            if mode == "auto":  # CUDA: replayed as a CUDA graph (launch-bound step); elsewhere plain inductor code
                mode = "reduce-overhead" if device.type == "cuda" else None
            # One compiled step per run: drop an earlier run's graphs of this code (dynamo would keep them,
            # guarded by object identity, and stop at its recompile limit after a few runs in one process).
            torch._dynamo.eval_frame.remove_from_cache(KDStep._step)
            self._fn = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode)

    def _params(self):
        return [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        return x.contiguous(memory_format=torch.channels_last) if self.runtime.channels_last else x

    def start_epoch(self) -> None:
        self.sums.zero_()
        self.images = 0
        if self.compiled:
            self.counter.fill_(self.scheduler.last_epoch)

    def step(self, pixels: torch.Tensor, generator: torch.Generator | None) -> None:
        dy, dx, mask = draw_crop_flip(pixels.shape[0], self.padding, self.hflip, generator, pixels.device)
        if self.compiled:
            self._fn(pixels, dy, dx, mask)
        else:
            x = self.prepare(apply_crop_flip(pixels, self.padding, dy, dx, mask))
            out, loss = kd_step(self.train_module, self.optimizer, x, self.runtime, self.scaler, self.extra_optimizers)
            self.sums += self._terms(out, loss)
        self.scheduler.step()
        self.images += pixels.shape[0]

    def totals(self) -> torch.Tensor:
        return self.sums

    def _terms(self, out, loss) -> torch.Tensor:
        entropy = attention_entropy(out.attention.detach()) if out.attention is not None else loss.new_zeros(())
        return torch.stack([loss.detach().float(), entropy.float(), *(out.losses[name].detach().float() for name in self.names)])

    def _step(self, pixels, dy, dx, mask) -> None:
        """The compiled body: everything from the uint8 batch to the updated weights and sums."""
        x = self.prepare(apply_crop_flip(pixels, self.padding, dy, dx, mask))
        with self.runtime.autocast():
            out = self.train_module(x)
            loss = total_loss(out.losses)
        loss.backward()
        with torch.no_grad():
            for plan, table in zip(self.plans, self.lr_tables):
                update(plan, table.index_select(1, self.counter.clamp(max=table.shape[1] - 1).view(1)).squeeze(1))
            self.counter.add_(1)
            self.sums.add_(self._terms(out, loss))


def enable_backward_tracing() -> None:
    """Dynamo traces `loss.backward()` into a graph only with this switch on (torch >= 2.9); without it every
    compiled step would break in two at the backward."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        raise RuntimeError(f"compile = on needs a torch whose dynamo traces backward() (2.9 or newer); this is {torch.__version__}: "
                           "set compile off")
    torch._dynamo.config.trace_autograd_ops = True


def loss_names(distiller: Distiller, num_classes: int, device: torch.device) -> list[str]:
    """The names of the KD loss's terms (fixed for a run), from one call on made-up logits."""
    with torch.no_grad():
        z = torch.zeros(2, num_classes, device=device)
        terms = distiller.kd_loss(z, z, raw_logits=z)
    return ["kd"] if isinstance(terms, torch.Tensor) else list(terms)


# -- the optimizer update, traceable ------------------------------------------------------------------
def check_compilable(opt: torch.optim.Optimizer) -> None:
    if type(opt) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise ValueError(f"compile = on updates SGD, Adam and AdamW in its graph, not {type(opt).__name__}: set compile off")
    for group in opt.param_groups:
        if group.get("amsgrad") or group.get("maximize") or group.get("dampening", 0) or group.get("differentiable"):
            raise ValueError(f"compile = on: {type(opt).__name__} with amsgrad/maximize/dampening is not compiled; set compile off")


def create_state(opt: torch.optim.Optimizer) -> None:
    """The state torch would create at the first step, created now (zeros, which give the first step's
    values: a momentum buffer of 0 times momentum plus the gradient is the gradient)."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if isinstance(opt, torch.optim.SGD):
                if group["momentum"] != 0 and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def lr_table(opt: torch.optim.Optimizer, scheduler, total_steps: int, device: torch.device) -> torch.Tensor:
    """(groups, steps) learning rates: what `scheduler` (a LambdaLR over `opt`) sets before each of the run's
    steps, or (groups, 1): the groups' constant rates when no scheduler drives `opt`."""
    if scheduler is None:
        rows = [[group["lr"]] for group in opt.param_groups]
    else:
        rows = [[base * f(k) for k in range(total_steps + 1)] for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def update_plan(opt: torch.optim.Optimizer) -> list[tuple]:
    """`opt` as plain values: (kind, hyperparameters, [(parameter, its state tensors)]) per group. The compiled
    step reads this, not the group dicts, whose 'lr' the scheduler rewrites every step (dynamo would guard on
    it and recompile); its state tensors are the optimizer's own, so checkpoints see every update."""
    kind = "sgd" if isinstance(opt, torch.optim.SGD) else "adamw" if isinstance(opt, torch.optim.AdamW) else "adam"
    plan = []
    for group in opt.param_groups:
        if kind == "sgd":
            hyper = (float(group["weight_decay"]), float(group["momentum"]), bool(group["nesterov"]))
            tensors = [(p, opt.state[p].get("momentum_buffer")) for p in group["params"]]
        else:
            hyper = (float(group["weight_decay"]), *map(float, group["betas"]), float(group["eps"]))
            tensors = [(p, opt.state[p]["step"], opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in group["params"]]
        plan.append((kind, hyper, tensors))
    return plan


def update(opt: torch.optim.Optimizer | list[tuple], lrs: torch.Tensor) -> None:
    """One step of `opt` (or its `update_plan`) with group g's learning rate `lrs[g]` (a device scalar); torch's
    formulas for SGD (momentum, Nesterov, L2 weight decay), Adam and AdamW. Gradients are None afterwards."""
    plan = update_plan(opt) if isinstance(opt, torch.optim.Optimizer) else opt
    with torch.no_grad():
        _update(plan, lrs)


def _update(plan: list[tuple], lrs: torch.Tensor) -> None:
    for g, (kind, hyper, tensors) in enumerate(plan):
        lr = lrs[g]
        if kind == "sgd":
            wd, momentum, nesterov = hyper
            for p, buf in tensors:
                if p.grad is None:
                    continue
                grad = p.grad + wd * p if wd else p.grad
                if momentum:
                    buf.mul_(momentum).add_(grad)
                    grad = grad + momentum * buf if nesterov else buf
                p.sub_(lr * grad)
                p.grad = None
            continue
        wd, beta1, beta2, eps = hyper
        for p, step, exp_avg, exp_avg_sq in tensors:
            if p.grad is None:
                continue
            grad = p.grad
            if kind == "adamw":
                p.mul_(1 - lr * wd)
            elif wd:
                grad = grad + wd * p
            step.add_(1)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(eps)
            p.sub_((lr / (1 - beta1**step)) * exp_avg / denom)
            p.grad = None
