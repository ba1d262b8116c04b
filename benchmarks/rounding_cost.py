"""Where a quantized recovery loses effect: a `recover` checkpoint's factors evaluated on a text
as trained (float) and rounded exactly as the file stores them.

`recover` reports both on its own held-out slice; this measures them on any text, for example
license texts that no training text resembles, to tell the rounding's share of what is lost
from what the float factors never learned.

    python benchmarks/rounding_cost.py START_FILE TEACHER CHECKPOINT TEXT --base MODEL
    # e.g. the float phase of a run:  OUTPUT.checkpoints/step-00000300/state.pt
    #      after its quantization-aware steps:  OUTPUT.checkpoints/qat/step-00000100/state.pt

START_FILE is the LoRA-Mini file the run started from (it fixes every module's storage; a run
with `--bits` stored at another width, which this does not model).
Prints the effect kept, 1 - KL(teacher||student) / KL(teacher||base), both ways; with
`--feedback-data FILE` also rounded with error feedback against the input moments on FILE's text
(recovery.rounding, what recover does with its training text after the float phase).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_convert import container  # noqa: E402
from lora_convert.api import load_adapter  # noqa: E402
from lora_convert.recovery import data as D  # noqa: E402
from lora_convert.errors import BadInputError  # noqa: E402
from lora_convert.recovery.layers import rounded  # noqa: E402
from lora_convert.recovery.loop import TrainState  # noqa: E402
from lora_convert.recovery.rounding import feedback_round_all, input_stats  # noqa: E402
from lora_convert.recovery.run import ModelOptions, evaluate, open_session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("start")
    ap.add_argument("teacher")
    ap.add_argument("checkpoint")
    ap.add_argument("text")
    ap.add_argument("--base", required=True)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--max-eval-sequences", type=int, default=16)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="cpu")
    ap.add_argument("--feedback-data", help="text for the input moments of error-feedback rounding")
    args = ap.parse_args()

    session = open_session(container.load(args.start), load_adapter(args.teacher),
                           ModelOptions(base=args.base, device=args.device, offline=True))
    # recover's checkpoints hold tensors only (torch.load with weights_only); TrainState.load is
    # how recover itself puts them back, and refuses a checkpoint of other modules
    saved = torch.load(args.checkpoint, map_location="cpu", weights_only=True)["tensors"]
    try:
        TrainState(session.layers, {}).load(saved, Path(args.checkpoint))
    except BadInputError as exc:
        sys.exit(f"{exc} (not a checkpoint of a recover run from {args.start})")
    pack = session.task == "causal-lm"  # as `eval` tokenizes
    held = D.tokenize(session.tokenizer, D.read_texts(args.text), args.max_len, pack=pack)[:args.max_eval_sequences]
    trained = evaluate(session, held, 4)
    with rounded(list(session.layers.values())):
        stored = evaluate(session, held, 4, reference=trained)
    line = (f"{args.checkpoint}: effect kept on {args.text}: {100 * trained['effect_kept']:.2f}% as trained, "
            f"{100 * stored['effect_kept']:.2f}% as stored")
    if args.feedback_data:
        seqs = D.tokenize(session.tokenizer, D.read_texts(args.feedback_data), args.max_len, pack=pack)
        stats = input_stats(session.accelerator.unwrap_model(session.model), session.layers, seqs, 4, session.pad_id)
        feedback_round_all(session.layers, stats)
        with rounded(list(session.layers.values())):
            fed = evaluate(session, held, 4, reference=trained)
        line += f", {100 * fed['effect_kept']:.2f}% rounded with error feedback on {args.feedback_data}"
    print(line)


if __name__ == "__main__":
    main()
