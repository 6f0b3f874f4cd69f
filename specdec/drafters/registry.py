"""Drafters by name: a plain dict of factories, plus ``module.path:Name`` import paths for out-of-tree drafters.

Every factory is called as ``factory(vocab_size=..., tree=..., **options)`` and returns a `Drafter`; an
import path names a class or function with the same call signature. Loading ``module.path:Name`` IMPORTS
that module, i.e. runs its code: it must be importable (on sys.path) and trusted, like any Python you run. Drafters that build their own trees
(plain, ngram) refuse a tree rather than silently ignoring it. Other modules add theirs with `register`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from specdec.drafters.base import Drafter, PlainDrafter, missing_members
from specdec.trees.tree import Tree

DrafterFactory = Callable[..., Drafter]
DEFAULT_COMPONENTS = ("ngram", "recycling")  # auto's components unless told otherwise  # (vocab_size: int, tree: Tree | None, **options) -> Drafter

_FACTORIES: dict[str, DrafterFactory] = {}


def register(name: str, factory: DrafterFactory) -> None:
    """Make `factory` available as `name`; re-registering a name replaces it."""
    if ":" in name:
        raise ValueError(f"drafter name '{name}' must not contain ':' (that marks an import path)")
    _FACTORIES[name] = factory


def drafter_names() -> list[str]:
    return list(_FACTORIES)


def unknown_drafter(name: str) -> str | None:
    """What is wrong with a drafter name (one line naming the choices), or None if it is registered or an
    import path: the check `make_drafter`, `SpecDecoder` and the batch bench all make before they build."""
    if name in _FACTORIES or ":" in name:
        return None
    return f"unknown drafter '{name}': choose one of {', '.join(_FACTORIES)}, or give module:Class"


def make_drafter(name: str, *, vocab_size: int, tree: Tree | None = None, context: dict[str, Any] | None = None,
                 **options: Any) -> Drafter:
    """A registered name or ``module.path:Name`` -> a new drafter instance.

    context: what the engine knows (e.g. ``target``, ``target_tokenizer``); each factory gets the keys it names
    in its ``context_keys`` attribute, unless the caller's options already set them.
    """
    problem = unknown_drafter(name)
    if problem:
        raise ValueError(problem)
    factory = _FACTORIES[name] if name in _FACTORIES else _import(name)
    for key in getattr(factory, "context_keys", ()):
        if context and key in context and key not in options:
            options[key] = context[key]
    _check_call(name, factory, vocab_size=vocab_size, tree=tree, **options)
    drafter = factory(vocab_size=vocab_size, tree=tree, **options)
    missing = missing_members(drafter)
    if missing:
        raise TypeError(f"drafter '{name}' built a {type(drafter).__name__}, which lacks {', '.join(missing)} of the "
                        "drafter protocol (specdec.drafters.base.Drafter; subclass BaseDrafter for the defaults)")
    return drafter


def needs_target_weights(name: str, options: dict[str, Any] | None = None) -> bool:
    """Whether drafter `name` (with `options`) computes with the target model's own dense weights (its factory
    asks for the `target` and does not say `native_target`: lexical, diffusion; for auto: any of its
    components), so a target loaded without them (`specdec.models.native`) cannot serve it. `self` runs on a
    natively loaded target's quantised weights."""
    options = options or {}
    if name == "auto":
        drafters = options.get("drafters")
        names = DEFAULT_COMPONENTS if drafters is None else [n.strip() for n in str(drafters).split("+") if n.strip()]
        return any(n != "auto" and needs_target_weights(n) for n in names)
    if unknown_drafter(name):
        return False
    factory = _FACTORIES[name] if name in _FACTORIES else _import(name)
    return "target" in getattr(factory, "context_keys", ()) and not getattr(factory, "native_target", False)


def parse_drafter(text: str, what: str = "drafter") -> tuple[str, dict[str, Any]]:
    """'name' or 'name[key=value;key=value]' -> (name, options), values read as YAML scalars: `auto[drafters=
    ngram+recycling+diffusion]`, `diffusion[cps=false]`. SpecdecError (naming `what`) for a malformed one."""
    import yaml

    from specdec.errors import SpecdecError

    name, bracket, body = text.partition("[")
    options: dict[str, Any] = {}
    if bracket:
        if not body.endswith("]") or not name:
            raise SpecdecError(f"{what}: write options as drafter[key=value;key=value], e.g. diffusion[cps=false]")
        for item in body[:-1].split(";"):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise SpecdecError(f"{what}: option '{item}' is not key=value, e.g. diffusion[cps=false]")
            options[key.strip()] = yaml.safe_load(value)
    return name, options


def _import(path: str) -> DrafterFactory:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"drafter '{path}': cannot import module '{module_name}' ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"drafter '{path}': module '{module_name}' has no callable '{attr}'")
    return factory


def _check_call(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Unknown or missing options become one clear ValueError instead of a TypeError from deep inside."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"drafter '{name}': {err}") from None
    except ValueError:  # no signature to inspect (some builtins): let the call itself complain
        pass


def _no_tree(name: str, tree: Tree | None) -> None:
    if tree is not None:
        raise ValueError(f"drafter '{name}' builds its own trees and takes no tree preset")


def _plain(vocab_size: int, tree: Tree | None) -> Drafter:
    _no_tree("plain", tree)
    return PlainDrafter()


def _ngram(vocab_size: int, tree: Tree | None, **options: Any) -> Drafter:
    from specdec.drafters.ngram import NgramDrafter  # numba: imported only when used

    _no_tree("ngram", tree)
    _check_call("ngram", NgramDrafter, **options)
    return NgramDrafter(**options)


def _recycling(vocab_size: int, tree: Tree | None, **options: Any) -> Drafter:
    from specdec.drafters.recycling import RecyclingDrafter

    _check_call("recycling", RecyclingDrafter, vocab_size, tree, **options)
    return RecyclingDrafter(vocab_size, tree, **options)  # tree None: a tree sized to each step's budget


def _model(vocab_size: int, tree: Tree | None, **options: Any) -> Drafter:
    from specdec.drafters.model import model_drafter  # loads a draft model: imported only when used

    _check_call("model", model_drafter, vocab_size, tree, **options)
    return model_drafter(vocab_size, tree, **options)


def _self(vocab_size: int, tree: Tree | None, **options: Any) -> Drafter:
    from specdec.drafters.self_spec import self_drafter

    _check_call("self", self_drafter, vocab_size, tree, **options)
    return self_drafter(vocab_size, tree, **options)


register("plain", _plain)
register("ngram", _ngram)
register("recycling", _recycling)
_model.context_keys = ("target_tokenizer",)  # type: ignore[attr-defined]
_self.context_keys = ("target", "target_tokenizer")  # type: ignore[attr-defined]
_self.native_target = True  # type: ignore[attr-defined]  # computes with a natively loaded target's own weights


def _diffusion(vocab_size: int, tree: Tree | None, **options: Any) -> Drafter:
    from specdec.drafters.diffusion.drafter import diffusion_drafter

    _check_call("diffusion", diffusion_drafter, vocab_size, tree, **options)
    return diffusion_drafter(vocab_size, tree, **options)


def _lexical(vocab_size: int, tree: Tree | None, **options: Any) -> Drafter:
    from specdec.drafters.lexical.drafter import lexical_drafter

    _check_call("lexical", lexical_drafter, vocab_size, tree, **options)
    return lexical_drafter(vocab_size, tree, **options)


def auto_drafter(vocab_size: int, tree: Tree | None = None, *, drafters: str | None = None,
                 draft_model: Any = None, propose_nodes: int = 32, target: Any = None,
                 target_tokenizer: Any = None) -> Drafter:
    """Registry factory for `auto`. drafters: the components, '+'-separated registered names, each built with
    its defaults (None: ngram+recycling, and `model` when a draft model is given); draft_model: a draft model
    (a load_model spec or a loaded model) for the `model` component; target, target_tokenizer: what the engine
    knows, handed to the components that ask for them. Any other option is refused (a typo is never ignored)."""
    from specdec.drafters.auto import MAX_PROPOSE, AutoDrafter

    context = {k: v for k, v in (("target", target), ("target_tokenizer", target_tokenizer)) if v is not None}
    if isinstance(propose_nodes, bool) or not isinstance(propose_nodes, int) or not 2 <= propose_nodes <= MAX_PROPOSE:
        raise ValueError(f"auto: propose_nodes must be a whole number in 2..{MAX_PROPOSE}, got {propose_nodes!r}")
    if tree is not None:
        raise ValueError("drafter 'auto' builds its own trees and takes no tree preset")
    if drafters is None:
        names = list(DEFAULT_COMPONENTS) + (["model"] if draft_model is not None else [])
    else:
        names = [n.strip() for n in str(drafters).split("+") if n.strip()]
    if not names or any(n in ("auto", "plain") for n in names):
        raise ValueError(f"auto: drafters must name one or more drafters other than auto and plain, "
                         f"e.g. ngram+recycling; got {drafters!r}")
    if ("model" in names) != (draft_model is not None):
        raise ValueError("auto: the model component and draft_model go together: give draft_model=DIR|NAME "
                         "(drafters then includes model unless you list them), or drop model from drafters")
    components = [make_drafter(n, vocab_size=vocab_size, context=context,
                               **({"draft_model": draft_model} if n == "model" else {})) for n in names]
    return AutoDrafter(components, propose_nodes=propose_nodes)


def _auto(vocab_size: int, tree: Tree | None, **options: Any) -> Drafter:
    _check_call("auto", auto_drafter, vocab_size, tree, **options)
    return auto_drafter(vocab_size, tree, **options)


_auto.context_keys = ("target", "target_tokenizer")  # type: ignore[attr-defined]  # for its components
_diffusion.context_keys = ("target",)  # type: ignore[attr-defined]
_lexical.context_keys = ("target",)  # type: ignore[attr-defined]

register("model", _model)
register("self", _self)
register("diffusion", _diffusion)
register("lexical", _lexical)
register("auto", _auto)
