from ..registry import Registry

#: name -> factory; metadata `kind` is "classifier" or "generator".
MODELS: Registry = Registry("model")
