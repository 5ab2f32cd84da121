"""AppTest fixtures: pages run from the repo root with runs and models in temporary folders."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pages import `pages.common` and `sft` from the repo root
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def app_dirs(tmp_path, monkeypatch):
    """Every app test gets empty runs/ and models/ folders (read by pages/common.py)."""
    runs, models = tmp_path / "runs", tmp_path / "models"
    runs.mkdir()
    models.mkdir()
    monkeypatch.setenv("SFT_RUNS_DIR", str(runs))
    monkeypatch.setenv("SFT_MODELS_DIR", str(models))
    monkeypatch.setenv("SFT_OLLAMA_URL", "http://127.0.0.1:9")  # nothing listens: Home says so fast
    monkeypatch.setenv("SFT_LOCK_DIR", str(tmp_path / "locks"))  # a device lock left by one test never blocks the next
    monkeypatch.chdir(ROOT)
    return {"runs": runs, "models": models}
