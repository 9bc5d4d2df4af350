"""``python -m tracetune.train sft|dpo ...``: the train commands as a module, for
``accelerate launch -m tracetune.train ...`` on several GPUs."""

from tracetune.cli.train import app

if __name__ == "__main__":
    app(prog_name="python -m tracetune.train")
