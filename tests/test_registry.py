import pytest

from kdci_ray.registry import Registry, UnknownNameError


def test_register_get_and_meta():
    reg = Registry("widget")

    @reg.register(color="red")
    def alpha():
        return 1

    @reg.register("beta-2")
    def beta():
        return 2

    assert reg.get("alpha")() == 1 and reg.get("beta-2")() == 2
    assert reg.meta("alpha") == {"color": "red"}
    assert reg.names() == ["alpha", "beta-2"] and "alpha" in reg and len(reg) == 2


def test_unknown_name_lists_known_and_suggests():
    reg = Registry("widget")
    reg.register("resnet18")(lambda: None)
    reg.register("resnet34")(lambda: None)
    with pytest.raises(UnknownNameError) as exc:
        reg.get("resnet35")
    msg = str(exc.value)
    assert "no such widget 'resnet35'" in msg and "resnet18, resnet34" in msg and "did you mean" in msg


def test_duplicate_registration_refused():
    reg = Registry("widget")
    reg.register("a")(lambda: None)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(lambda: None)
