"""``python -m train.eval checkpoint=<run dir or checkpoint> tasks=[bpb,passkey] lengths=[8192,16384]``: the
evals of a trained model (the Hydra app; conf/eval.yaml, schema train/eval/config.py's EvalAppConfig).

Writes ``results.json``, ``tables.json`` and the PNG plots to ``out`` (default ``<run dir>/eval/
checkpoint_<step>``) and prints the ``eval/...`` metrics.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import OmegaConf

from train.__main__ import CONFIG_DIR
from train.eval.config import EvalAppConfig, check_eval, fit_default_tasks
from train.eval.report import write_report
from train.eval.runner import evaluate, flatten
from train.generate import check_phase, load_model


def run_eval(cfg: EvalAppConfig) -> tuple[dict, Path]:
    """Evaluate the checkpoint; returns the results and the folder they were written to."""
    check_phase(cfg.phase)
    loaded = load_model(cfg.checkpoint, cfg.device, cfg.impl, cfg.precision)
    data = loaded.cfg.data
    check_eval(cfg, loaded.stage.seq_len, "")  # the settings themselves, before the tasks are sized
    left_out = fit_default_tasks(cfg, loaded.stage.seq_len, loaded.tokenizer, data.image, "")
    if left_out:
        print(left_out)
    check_eval(cfg, loaded.stage.seq_len, "", loaded.tokenizer, data.image)
    results = evaluate(loaded.model, loaded.tokenizer, cfg, train_len=loaded.stage.seq_len,
                       phase=cfg.phase or loaded.stage.phase, image_cfg=data.image,
                       heldout_every=data.corpus.heldout_every, step=loaded.step, log=print)
    results["checkpoint"] = str(loaded.path)
    out = Path(cfg.out) if cfg.out else loaded.path.parents[1] / "eval" / f"checkpoint_{loaded.step:08d}"
    write_report(results, out)
    return results, out


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="eval_schema", node=EvalAppConfig)


register_schema()


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def main(cfg) -> None:
    results, out = run_eval(OmegaConf.to_object(cfg))
    for key, value in flatten(results).items():
        print(f"{key:48s} {'-' if value is None else f'{value:.4f}'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
