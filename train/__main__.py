"""``python -m train``: the Hydra app (config tree in ``conf/``, entry config ``train``).

Every setting is a dotted override, e.g. ``python -m train model=small attention.topk=8
data.seq_len=32768 train.steps=100 logging.wandb.mode=disabled run_dir=runs/x``. Under the deepspeed
launcher use ``--no_local_rank``: Hydra rejects ``--local_rank``; the rank comes from the env.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from train.config import register_schema, to_train_config
from train.loop import train

register_schema()
# A wheel carries conf/ as the package train.conf (setup.py); a checkout has it beside train/.
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = str(_HERE / "conf" if (_HERE / "conf" / "train.yaml").is_file() else _HERE.parent / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(to_train_config(cfg))


if __name__ == "__main__":
    main()
