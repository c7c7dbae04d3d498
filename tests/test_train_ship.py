"""`train.ship`: the shipped JSON records a continued run's starting weights (lineage)."""
import json

import yaml

from mobilevit_deploy.checkpoint import file_sha256
from mobilevit_deploy.train.ship import _run_summary


def test_continued_run_records_the_weights_it_started_from(tmp_path):
    init = tmp_path / "stage1.safetensors"
    init.write_bytes(b"weights of stage 1")
    init.with_suffix(".json").write_text(json.dumps(
        {"recipe": "recipes/a.yaml", "epochs": 11, "val_top1": 73.3, "unrelated": 1,
         "init_from": {"sha256": "abc", "recipe": "recipes/stage0.yaml", "epochs": 5}}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"name": "mobilevit_xxs", "init_checkpoint": str(init)},
         "multisize": {"enabled": True, "sizes": [32], "kd_weight": 1.0, "kd_temperature": 1.0}}))
    (run / "metrics.json").write_text(json.dumps(
        [{"epoch_time_s": 100.0, "val_time_s": 1.0, "images": 5000}] * 2))
    out = _run_summary(run)
    assert out["init_from"] == {"sha256": file_sha256(init), "recipe": "recipes/a.yaml", "epochs": 11,
                                "val_top1": 73.3,  # and the stage before it: the whole chain
                                "init_from": {"sha256": "abc", "recipe": "recipes/stage0.yaml", "epochs": 5}}
    assert out["multisize"]["sizes"] == [32]
    assert out["train_time_s"] == 202.0 and out["train_img_per_s"] == 50.0


def test_run_from_scratch_has_no_lineage(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "mobilevit_xxs"}}))
    assert "init_from" not in _run_summary(tmp_path)
