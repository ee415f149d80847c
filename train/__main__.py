"""``python -m train``: the Hydra app (config tree in ``conf/``, entry config ``train``).

Every setting is a dotted override, e.g. ``python -m train model=small attention.topk=8
data.seq_len=32768 train.steps=100 logging.wandb.mode=disabled run_dir=runs/x``. Under the deepspeed
launcher use ``--no_local_rank``: Hydra rejects ``--local_rank``; the rank comes from the env.
"""

import hydra
from omegaconf import DictConfig

from train.config import register_schema, to_train_config
from train.loop import train

register_schema()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(to_train_config(cfg))


if __name__ == "__main__":
    main()
