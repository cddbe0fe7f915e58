"""Train the built-in model ``zoo:tiny-lm`` and write it as a Hugging Face directory.

``zoo:tiny-lm`` is a small Llama-architecture causal LM (about 5.4M parameters,
grouped-query attention) with its own byte-level BPE tokenizer, both trained
here on the train split of the offline corpus in ``edgec.data`` (Shakespeare
plays and the Python docs). It exists so the compiler has a real, trained model
that is small enough to commit and to compile quickly.

Usage (from the repository root)::

    .venv/bin/python scripts/train_tiny_lm.py                 # ~35 minutes
    .venv/bin/python scripts/train_tiny_lm.py --steps 1200    # a fixed step count
    .venv/bin/python scripts/train_tiny_lm.py --minutes 1 --out /tmp/tiny-lm

With ``--minutes`` the script times its first steps, fixes the number of steps
that fits the budget, and then trains exactly that many; ``metrics.json``
records the count, and rerunning with ``--steps <count>`` and the same seed
repeats the run (one CPU thread, so the arithmetic is deterministic).

The output directory gets ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32), the tokenizer files, ``training_log.txt`` and
``metrics.json``. Everything is written to a temporary directory next to it
and renamed into place at the end, so an interrupted run leaves the previous
model intact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parent.parent
# The repository is not an installed package; make `edgec` importable when the
# script is run by path.
sys.path.insert(0, str(REPO_ROOT))

from edgec import data  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "edgec" / "zoo" / "tiny-lm"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# Listed first so they get ids 0, 1, 2 whatever the vocabulary size.
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]

# Steps timed to size a --minutes run; the first few are skipped because they
# include one-off allocation costs.
CALIBRATION_STEPS = 20
CALIBRATION_SKIP = 5


@dataclass(frozen=True)
class TrainArgs:
    """Command-line settings of one run."""

    out: Path
    minutes: float
    steps: int | None
    seed: int
    vocab_size: int
    seq_len: int
    batch_size: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    log_every: int
    eval_tokens: int


def parse_args(argv: list[str]) -> TrainArgs:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (replaced if present)")
    parser.add_argument("--minutes", type=float, default=35.0, help="wall-clock budget for the training steps")
    parser.add_argument("--steps", type=int, default=None, help="train exactly this many steps (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256, help="window length including the leading BOS")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-tokens", type=int, default=32768, help="size of the held-out evaluation slice")
    ns = parser.parse_args(argv)
    if ns.steps is not None and ns.steps <= 0:
        parser.error("--steps must be positive")
    if ns.minutes <= 0:
        parser.error("--minutes must be positive")
    return TrainArgs(
        out=ns.out.resolve(),
        minutes=ns.minutes,
        steps=ns.steps,
        seed=ns.seed,
        vocab_size=ns.vocab_size,
        seq_len=ns.seq_len,
        batch_size=ns.batch_size,
        lr=ns.lr,
        min_lr_ratio=ns.min_lr_ratio,
        warmup_steps=ns.warmup_steps,
        weight_decay=ns.weight_decay,
        log_every=ns.log_every,
        eval_tokens=ns.eval_tokens,
    )


class Log:
    """Prints status lines and keeps them for ``training_log.txt``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f}s] {message}"
        self.lines.append(line)
        print(line, flush=True)


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the train split only."""
    backend = Tokenizer(models.BPE())
    # No prefix space: a text's first word must tokenize the same way whether it
    # starts a prompt or sits in the middle of the training stream.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # Every byte gets a token, so any text (also unseen scripts) encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    train_docs = (text for doc_id, text in data.corpus_documents() if data.split_of(doc_id) == data.TRAIN)
    backend.train_from_iterator(train_docs, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    # The model is trained on windows that start with BOS, so a normal call
    # `tok(text)` must prepend it too.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        # Llama takes no token_type_ids; the default list would make
        # `model.generate(**tok(text, return_tensors="pt"))` fail.
        model_input_names=["input_ids", "attention_mask"],
    )


def build_model(tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=8,
        # Fewer KV heads than query heads so compiler passes see grouped-query
        # attention, as in the real models this model stands in for.
        num_key_value_heads=4,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return model


def make_optimizer(model: LlamaForCausalLM, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices only; norm gains are 1-D and decaying them towards 0 only hurts.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total_steps: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - 1 - args.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


def sample_batch(stream: torch.Tensor, bos_id: int, args: TrainArgs, gen: torch.Generator) -> torch.Tensor:
    """Random windows of the train stream, each of ``seq_len`` tokens starting with BOS."""
    body = args.seq_len - 1
    starts = torch.randint(0, stream.numel() - body, (args.batch_size,), generator=gen)
    batch = torch.empty((args.batch_size, args.seq_len), dtype=torch.long)
    batch[:, 0] = bos_id
    for row, start in enumerate(starts.tolist()):
        batch[row, 1:] = stream[start : start + body]
    return batch


@dataclass(frozen=True)
class HeldOutResult:
    n_tokens: int
    n_bytes: int
    nll_nats: float
    unigram_nll_nats: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_nats / self.n_tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / self.n_bytes

    @property
    def unigram_bits_per_byte(self) -> float:
        return self.unigram_nll_nats / math.log(2) / self.n_bytes


@torch.no_grad()
def evaluate_held_out(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    ids: list[int],
    train_stream: torch.Tensor,
    seq_len: int,
) -> HeldOutResult:
    """Score every token of the held-out slice exactly once.

    The slice is cut into consecutive, non-overlapping chunks of ``seq_len - 1``
    tokens; each window is BOS followed by one chunk, so windows look like the
    training windows and each chunk's first token is predicted from BOS alone.
    """
    model.eval()
    body = seq_len - 1
    slice_ids = torch.tensor(ids, dtype=torch.long)
    nll = 0.0
    chunks = [slice_ids[i : i + body] for i in range(0, len(ids), body)]
    eval_batch = 16
    for first in range(0, len(chunks), eval_batch):
        group = chunks[first : first + eval_batch]
        # The last chunk can be shorter; score each length group separately
        # rather than padding, so no mask is involved.
        for length in sorted({c.numel() for c in group}):
            same = [c for c in group if c.numel() == length]
            inputs = torch.cat([torch.full((len(same), 1), tok.bos_token_id), torch.stack(same)], dim=1)
            logits = model(input_ids=inputs).logits[:, :-1]
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1), reduction="sum"
            ).item()
    model.train()

    # Unigram baseline: token frequencies of the train stream, add-one smoothed
    # so no held-out token has probability 0.
    counts = torch.bincount(train_stream, minlength=len(tok)).double() + 1.0
    log_probs = torch.log(counts / counts.sum())
    unigram_nll = -log_probs[slice_ids].sum().item()

    n_bytes = len(tok.decode(ids).encode("utf-8"))
    return HeldOutResult(n_tokens=len(ids), n_bytes=n_bytes, nll_nats=nll, unigram_nll_nats=unigram_nll)


def write_output(
    out: Path,
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    log: Log,
    metrics: dict[str, object],
) -> None:
    """Write everything into a temporary sibling directory, then swap it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        (tmp / "training_log.txt").write_text("\n".join(log.lines) + "\n", encoding="utf-8")
        # mkdtemp makes the directory private (0700) and safetensors writes its
        # file 0600; the installed model should be readable like the rest of the repo.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if old.exists():
        shutil.rmtree(old)


def reproduce_command(args: TrainArgs, steps: int) -> str:
    """The command that repeats this run step for step, every setting spelled out."""
    words = ["python", "scripts/train_tiny_lm.py", "--steps", str(steps)]
    for name, value in vars(args).items():
        if name in ("out", "minutes", "steps"):
            continue
        words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(words)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    log = Log()
    command = shlex.join(["python", "scripts/train_tiny_lm.py", *argv])
    log(f"command: {command}")
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")

    docs = data.corpus_documents()
    n_held_out = sum(1 for doc_id, _ in docs if data.split_of(doc_id) == data.HELD_OUT)
    log(f"corpus: {len(docs)} documents, {n_held_out} held out")

    tok = train_tokenizer(args.vocab_size)
    log(f"tokenizer: byte-level BPE, {len(tok)} tokens, bos={tok.bos_token_id} eos={tok.eos_token_id}")

    train_ids = tok(data.train_text(), add_special_tokens=False, verbose=False)["input_ids"]
    # int64 because torch indexing and embedding lookups want it; ~4M tokens is small.
    stream = torch.tensor(train_ids, dtype=torch.long)
    n_train_bytes = len(data.train_text().encode("utf-8"))
    log(f"train stream: {stream.numel()} tokens, {n_train_bytes / stream.numel():.2f} bytes/token")

    model = build_model(tok, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters, config {model.config.to_diff_dict()}")

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()

    total_steps = args.steps if args.steps is not None else CALIBRATION_STEPS + 1
    budget_s = args.minutes * 60.0
    train_start = time.monotonic()
    calibration_start = train_start
    interval_loss = 0.0
    interval_steps = 0
    interval_start = train_start
    recent_losses: list[float] = []
    step = 0
    while step < total_steps:
        lr = lr_at(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(stream, tok.bos_token_id, args, gen)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        loss_value = loss.item()
        interval_loss += loss_value
        interval_steps += 1
        recent_losses = (recent_losses + [loss_value])[-50:]
        step += 1

        if args.steps is None and step == CALIBRATION_SKIP:
            calibration_start = time.monotonic()
        if args.steps is None and step == CALIBRATION_STEPS:
            # Fix the step count now, before warmup ends, so the LR schedule is
            # purely a function of the step and `--steps total_steps` repeats it.
            per_step = (time.monotonic() - calibration_start) / (CALIBRATION_STEPS - CALIBRATION_SKIP)
            remaining = budget_s - (time.monotonic() - train_start)
            total_steps = max(step + 1, step + int(remaining / per_step))
            if total_steps <= args.warmup_steps:
                log(f"warning: budget fits only {total_steps} steps, fewer than the {args.warmup_steps} warmup steps")
            log(f"calibration: {per_step:.2f} s/step, training {total_steps} steps in {args.minutes:g} minutes")

        if step % args.log_every == 0 or step == total_steps:
            now = time.monotonic()
            tokens_per_s = interval_steps * args.batch_size * args.seq_len / (now - interval_start)
            log(
                f"step {step}/{total_steps} loss {interval_loss / interval_steps:.4f} lr {lr:.2e} "
                f"tok/s {tokens_per_s:.0f} elapsed {(now - train_start) / 60:.1f} min"
            )
            interval_loss, interval_steps, interval_start = 0.0, 0, now

    train_minutes = (time.monotonic() - train_start) / 60.0
    train_loss = sum(recent_losses) / len(recent_losses)
    log(f"trained {step} steps in {train_minutes:.1f} min, train loss (mean of last {len(recent_losses)}) {train_loss:.4f}")

    held_out_ids = data.held_out_slice(tok, args.eval_tokens)
    result = evaluate_held_out(model, tok, held_out_ids, stream, args.seq_len)
    log(
        f"held-out ({result.n_tokens} tokens, {result.n_bytes} bytes): ppl {result.perplexity:.2f}, "
        f"{result.bits_per_byte:.4f} bits/byte (unigram baseline {result.unigram_bits_per_byte:.4f} bits/byte)"
    )

    metrics: dict[str, object] = {
        "steps": step,
        "minutes": round(train_minutes, 2),
        "train_loss": round(train_loss, 4),
        "held_out_tokens": result.n_tokens,
        "held_out_bytes": result.n_bytes,
        "held_out_ppl": round(result.perplexity, 3),
        "held_out_bits_per_byte": round(result.bits_per_byte, 4),
        "unigram_bits_per_byte": round(result.unigram_bits_per_byte, 4),
        "n_params": n_params,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "peak_lr": args.lr,
        "train_tokens_seen": step * args.batch_size * (args.seq_len - 1),
        "train_stream_tokens": stream.numel(),
        "command": command,
        "reproduce": reproduce_command(args, step),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    write_output(args.out, model, tok, log, metrics)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
