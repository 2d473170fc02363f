"""Generate text from a trained GPT: the seed's entry point, kept verbatim. Same as `gptlab generate ...`.

Example:
    python src/generate.py --prompt "Once upon a time" --model_path my_gpt_experiment_e50.pth --length 200
"""

import sys

from gptlab.cli import main  # Python puts this script's folder, src/, on the path

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
