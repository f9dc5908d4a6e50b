"""arzoo's spine: the token contract, the registry, checkpoint I/O, data and pipelines."""
from zoo.checkpoint import CheckpointError, load_pretrained, save_pretrained
from zoo.errors import UserError
from zoo.module import ZooModule
from zoo.registry import create, entry, import_plugins, info, register
from zoo.registry import list_models as list  # noqa: A001  (timm-style `zoo.list("generator/*")`)
from zoo.registry import list_models
from zoo.tokens import IncompatibleTokens, TokenError, Tokens, TokenSpec

__all__ = ["TokenSpec", "Tokens", "TokenError", "IncompatibleTokens", "ZooModule", "register",
           "create", "list", "list_models", "info", "entry", "save_pretrained", "load_pretrained",
           "CheckpointError", "UserError", "import_plugins"]
