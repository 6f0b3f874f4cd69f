"""Rendering a model's chat template (untrusted Jinja from a model folder or a GGUF) within limits.

The template runs in Jinja's immutable sandbox (no attribute tricks, no mutation of its inputs), configured as
transformers configures its own (trim_blocks, lstrip_blocks, loop controls, `tojson`, `raise_exception`,
`strftime_now`, `{% generation %}`), and is also bounded: every loop iteration, call, attribute and item
access checks a deadline; string and list operations (`*`, `+`, `~`, filters, method calls) and the output
itself check a size limit before or right after they build anything. Whatever the template raises, or a limit
it reaches, is one `SpecdecError`: "the model's chat template failed: ...; use --raw to skip it".
"""

from __future__ import annotations

import contextvars
import json
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any, Iterable, Iterator

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from specdec.errors import SpecdecError

TIME_LIMIT_S = 2.0  # real templates render in a few milliseconds
MIN_OUTPUT_CHARS = 2**20  # the output limit: this, plus 8 characters for each character of the messages
_GUARD, _SIZED = "specdec_guarded_iter", "specdec_sized"  # names the rewritten template calls


@dataclass(frozen=True)
class _Limits:
    deadline: float  # time.monotonic() at which rendering stops
    chars: int  # the longest string or list a template may build, and its whole output


class TemplateLimit(Exception):
    """A chat template ran past its time or size limit."""


_limits: contextvars.ContextVar[_Limits] = contextvars.ContextVar("specdec_template_limits")


def _check_time() -> None:
    if time.monotonic() > _limits.get().deadline:
        raise TemplateLimit(f"it ran longer than {TIME_LIMIT_S:g} s")


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > _limits.get().chars:
        raise TemplateLimit(f"it built a value of {len(value):,} items (at most {_limits.get().chars:,})")
    return value


def _guarded_iter(iterable: Any) -> Iterator[Any]:
    for i, item in enumerate(iterable):
        if not i & 255:
            _check_time()
        yield item


def _check_int_args(args: Iterable[Any]) -> None:
    """Widths and counts (`'x'.ljust(n)`, `center(n)`, `indent(n)`) are refused above the size limit."""
    for a in args:
        if isinstance(a, int) and abs(a) > _limits.get().chars:
            raise TemplateLimit(f"it asked for a size of {a:,} (at most {_limits.get().chars:,})")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the deadline and size checks of every operation a template can loop on."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context, operator, left, right):
        _check_time()
        if operator == "*" and isinstance(left, int) != isinstance(right, int):
            seq, n = (right, left) if isinstance(left, int) else (left, right)
            if isinstance(seq, (str, list, tuple)) and len(seq) * n > _limits.get().chars:
                raise TemplateLimit(f"it repeated a value {n:,} times")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
            raise TemplateLimit(f"it raised a number to the power {right:,}")
        return _sized(super().call_binop(context, operator, left, right))

    def getattr(self, obj, attribute):
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_time()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _check_time()
        _check_int_args([*args, *kwargs.values()])
        return _sized(super().call(__context, __obj, *args, **kwargs))


def _bounded_filter(f):
    @wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def run(*args, **kwargs):
        _check_time()
        _check_int_args([*args[1:], *kwargs.values()])
        return _sized(f(*args, **kwargs))
    return run


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """namespace() without underscore-prefixed attributes (as transformers': no handle on Python internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - Namespace's own signature trick
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' ({name!r})")


class _Dict:
    """dict() and dict.fromkeys() without a handle on the dict type itself (as transformers')."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> _BoundedSandbox:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace, dict=_Dict(),
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.globals[_GUARD], env.globals[_SIZED] = _guarded_iter, _sized
    return env


class _Bound(NodeTransformer):
    """Wraps every loop's iterable in the deadline check and every `~` concatenation in the size check: Jinja
    compiles both to plain Python that the sandbox never sees."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(_GUARD, "load"), [node.iter], [], None, None).set_lineno(node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name(_SIZED, "load"), [node], [], None, None).set_lineno(node.lineno)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _environment()
    tree = _Bound().visit(env.parse(source))
    tree.set_environment(env)
    return env.from_string(tree)


RAW_HINT = "use --raw to skip it"


def render(source: str, messages: list, variables: dict[str, Any], hint: str = RAW_HINT) -> str:
    """`source` rendered for `messages` with add_generation_prompt on and `variables` (the tokenizer's special
    tokens), within TIME_LIMIT_S and an output limit of MIN_OUTPUT_CHARS + 8 characters per message character.
    SpecdecError (one line, ending in `hint`: what the user can do) for anything the template raises or a limit
    it reaches."""
    size = sum(len(str(m.get("content", ""))) for m in messages)
    token = _limits.set(_Limits(time.monotonic() + TIME_LIMIT_S, MIN_OUTPUT_CHARS + 8 * size))
    try:
        template = _compile(source)
        out, total = [], 0
        for chunk in template.generate(**{**variables, "messages": messages, "tools": None, "documents": None,
                                          "add_generation_prompt": True}):
            total += len(chunk)
            if total > _limits.get().chars:
                raise TemplateLimit(f"its output passed {_limits.get().chars:,} characters")
            _check_time()
            out.append(chunk)
        return "".join(out)
    except Exception as err:  # noqa: BLE001 - an untrusted template can raise anything; each is one line
        raise SpecdecError(f"the model's chat template failed: {_describe(err)}; {hint}") from None
    finally:
        _limits.reset(token)


def _describe(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0][:200] if lines else ""
    kind = "" if isinstance(err, TemplateLimit) else type(err).__name__
    return f"{kind}: {text}" if kind and text else (kind or text)
