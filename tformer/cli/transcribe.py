"""``tformer transcribe``: Transcribe WAV files with a trained speech recognizer (an ``asr`` run's export).

    tformer transcribe --checkpoint runs/asr_espeak FILE.wav [FILE.wav ...]

Prints one transcript per file. ``--checkpoint`` takes an export folder, a run folder or a
checkpoint folder (as ``tformer sample``). Audio at another sample rate is resampled
with librosa; stereo is averaged to mono. Audio longer than the encoder's ``max_source_len``
positions is cut into equal chunks that fit, transcribed one by one and joined with spaces.
A file too short to hold one analysis window gets a warning and an empty line; the other files
are still transcribed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tformer.generation.seq2seq import beam_search, decode
from tformer.generation.transcribe import chunks, max_chunk_samples, read_audio
from tformer.models.pretrained import find_export


def build_parser(prog: str = "tformer transcribe") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="export, run or checkpoint folder of an asr model")
    parser.add_argument("files", nargs="+", metavar="FILE.wav", help="audio files to transcribe")
    parser.add_argument("--beams", type=int, default=1, help="beam width (1: greedy decoding)")
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=None,
                        help="sample instead of greedy decoding, at this temperature")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser




def main(argv: list[str] | None = None, *, prog: str = "tformer transcribe") -> list[str]:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.beams < 1:
        parser.error(f"argument --beams must be >= 1, got {args.beams}")
    if args.temperature is not None and (args.temperature <= 0 or args.beams > 1):
        parser.error(f"argument --temperature must be > 0 and cannot be combined with --beams > 1, got "
                     f"{args.temperature} with --beams {args.beams}")
    for name in args.files:
        if not Path(name).is_file():
            parser.error(f"argument FILE.wav: {name!r} is not a file")
    try:
        export = find_export(args.checkpoint)
    except FileNotFoundError as error:
        parser.error(str(error).replace("sample: ", ""))

    from tformer.data.speech import AsrVocab
    from tformer.models.pretrained import load_pretrained

    model, metadata = load_pretrained(export, device=args.device)
    if metadata.get("vocab", {}).get("kind") != "asr_chars":
        parser.error(f"argument --checkpoint: {export} is not a speech recognizer (task 'asr')")
    vocab = AsrVocab.from_dict(metadata["vocab"])
    options = dict(bos_id=metadata["bos_id"], eos_id=metadata["eos_id"], max_len=metadata["max_text_len"] + 1)
    transcripts, skipped = [], []
    limit = max_chunk_samples(model)
    shortest = model.source_embedding.log_mel.n_fft  # one STFT window; fewer samples hold no speech
    for name in args.files:
        try:
            audio = read_audio(Path(name), metadata["sample_rate"])
        except RuntimeError as error:  # soundfile's error for a file it cannot read
            raise ValueError(f"argument FILE.wav: cannot read {name!r} as audio ({error})") from error
        if len(audio) < shortest:
            print(f"warning: {name}: {len(audio)} samples ({len(audio) / metadata['sample_rate']:.4f} s) are too "
                  f"short to transcribe (at least {shortest}); printed an empty line", file=sys.stderr)
            skipped.append(name)
            transcripts.append("")
            print("")
            continue
        pieces = []
        for piece in chunks(audio, limit):
            waveform = torch.from_numpy(piece)[None].to(args.device)
            lengths = torch.tensor([waveform.shape[1]], device=args.device)
            if args.beams > 1:
                ids = beam_search(model, waveform, lengths, num_beams=args.beams,
                                  length_penalty=args.length_penalty, **options)
            elif args.temperature is not None:
                generator = torch.Generator(device=args.device).manual_seed(args.seed)
                ids = decode(model, waveform, lengths, greedy=False, temperature=args.temperature,
                             top_k=args.top_k, generator=generator, **options)
            else:
                ids = decode(model, waveform, lengths, **options)
            pieces.append(vocab.decode(ids[0]).strip())
        transcripts.append(" ".join(piece for piece in pieces if piece))
        print(transcripts[-1], flush=True)
    if skipped:
        print(f"warning: {len(skipped)} of {len(args.files)} files were too short to transcribe: "
              f"{', '.join(skipped)}", file=sys.stderr)
        raise SystemExit(1)
    return transcripts
