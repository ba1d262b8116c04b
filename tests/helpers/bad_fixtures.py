"""scripts/make_bad_fixtures.py loaded as a module, for its byte-level builders (safetensors
files, PEFT directories, LoRA-Mini edits) and to compare its output with fixtures/bad/."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_bad_fixtures.py"

_spec = importlib.util.spec_from_file_location("make_bad_fixtures", SCRIPT)
mbf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mbf)
