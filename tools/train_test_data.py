"""What the nextron-train end-to-end tests (test_train_cli.py, test_train_mpi.py) share: a fresh work directory with
a byte-tokenized training file made from this repo's README (a few hundred kB of real text)."""
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "models", "qwen3-next-tiny.json")


def fresh_byte_dataset(work):
    """Empties `work`, writes the README four times as corpus.txt and preprocesses it; returns the data.h5 path."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    text = os.path.join(work, "corpus.txt")
    with open(text, "w") as f:
        f.write(open(os.path.join(REPO, "README.md")).read() * 4)
    data = os.path.join(work, "data.h5")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess.py"), text, "--tokenizer", "byte",
                    "--out", data], check=True, capture_output=True)
    return data
