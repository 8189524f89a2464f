"""Register fedtune's exported model classes with transformers' Auto classes, so a plain `pipeline(...)` loads
an export without running code from its folder; done once transformers is imported, to keep `fedtune.client` light."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing's own flag, without importing typing (2 ms of `import fedtune.client`)
if TYPE_CHECKING:  # importlib.abc alone would add 7 ms (importlib.resources)
    from collections.abc import Callable
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType


def register_auto_classes() -> None:
    """Make AutoConfig and AutoModelForSequenceClassification resolve a mean-pooled export to fedtune's installed
    classes. transformers then sees local code for the export's model type and never offers to run its `pooling.py`
    (`resolve_trust_remote_code`: local code wins, without a prompt, unless trust_remote_code=True is passed)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fedtune.client.pooling import BertForSequenceClassification, MeanPooledBertConfig

    AutoConfig.register(MeanPooledBertConfig.model_type, MeanPooledBertConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(MeanPooledBertConfig, BertForSequenceClassification, exist_ok=True)


def register_when_transformers_loads() -> None:
    """Register now if transformers is already imported, else right after its own import finishes: importing it
    here would cost `import fedtune.client` about a second of torch and transformers that most uses never need."""
    if "transformers" in sys.modules:
        register_auto_classes()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("transformers", register_auto_classes))


class _AfterImport:
    """A meta path finder that finds nothing itself: it hands the import of `name` to the other finders and
    has `then` run once that module is done."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(self, fullname: str, path, target=None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        import importlib.util  # here, not at the top: it costs `import fedtune.client` 3 ms (contextlib)

        sys.meta_path.remove(self)  # once only; and the search below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenLoader(spec.loader, self.then)
        return spec


class _ThenLoader:
    """The module's own loader, with `then` run after the module has executed."""

    def __init__(self, loader: Loader, then: Callable[[], None]) -> None:
        self.loader = loader
        self.then = then

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.then()

    def __getattr__(self, name: str):
        return getattr(self.loader, name)  # resource readers, is_package and the like stay the original loader's
