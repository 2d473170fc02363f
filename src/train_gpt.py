"""Train a GPT: the seed's entry point, kept verbatim. Same as `gptlab train ...`.

Example:
    python src/train_gpt.py --tokenizer ./toy_data/tiny_sp --tokenizer_type default \
        --train_data ./toy_data/tiny_sp_train.txt --eval_data ./toy_data/tiny_sp_test.txt \
        --epochs 50 --experiment_name my_gpt_experiment --batch_size 32
"""

import sys

from gptlab.cli import main  # Python puts this script's folder, src/, on the path

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
