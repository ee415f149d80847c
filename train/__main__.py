"""``python -m train``: the Hydra app (config tree in ``conf/``, entry config ``train``).

Every setting is a dotted override, e.g. ``python -m train model=small attention.topk=8
data.seq_len=32768 run.steps=100 logging.wandb.mode=disabled run_dir=runs/x``. Under ``--multirun``
each job trains in its own ``run_dir/<job number>``. Under the deepspeed launcher use
``--no_local_rank``: Hydra rejects ``--local_rank``; the rank comes from the environment.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from train.config import check_moved_keys, register_schema, to_train_config
from train.loop import train

register_schema()
# A wheel carries conf/ as the package train.conf (setup.py); a checkout has it beside train/.
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = str(_HERE / "conf" if (_HERE / "conf" / "train.yaml").is_file() else _HERE.parent / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    config = to_train_config(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # one run directory per job, never a neighbour's checkpoint
        config.run_dir = hydra_cfg.runtime.output_dir
    train(config)


if __name__ == "__main__":
    try:
        check_moved_keys([a for a in sys.argv[1:] if not a.startswith("-")])
    except ValueError as e:
        sys.exit(f"error: {e}")
    main()
