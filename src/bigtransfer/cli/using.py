"""Verbs that use a trained model: evaluate, predict, embed, export, push, serve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import BigTransferError
from ..safe_text import line as one_line
from ..safe_text import path_text
from .common import (
    add_data_args,
    add_model_args,
    add_runtime_args,
    positive_int,
    verb,
)


def _add_evaluate(sub) -> None:
    p = verb(sub, "evaluate", "Top-1, top-5, per-class accuracy and a confusion matrix on labelled data.",
              "  bigtransfer evaluate --model runs/flowers --data ~/data/flowers --out runs/flowers/eval\n"
              "  bigtransfer evaluate --model model.safetensors --data test.csv --split train\n")
    add_model_args(p)
    add_data_args(p, training=False)
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--out", type=Path, default=None,
                   help="write metrics.json, per_class_accuracy.csv, confusion.csv and confusion.png here")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from ..inference.evaluation import evaluate

    result = evaluate(args.model, args.data, split=args.split, val_fraction=args.val_fraction, out=args.out,
                      batch=args.batch, workers=args.workers, device=args.device, resolution=args.resolution,
                      progress=not args.quiet, backend=args.backend, precision=args.precision)
    if not args.quiet:
        print(f"bigtransfer: backend {result['backend']}, {result['precision']} ({result['backend_choice']})",
              file=sys.stderr)
    print(f"top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  loss {result['loss']:.4f}  "
          f"({result['examples']} images, {args.split} split)")
    if args.out:
        print(f"reports in {args.out}")
    return 0


def _add_predict(sub) -> None:
    p = verb(sub, "predict", "Top-k labels with class names and probabilities for images.",
              "  bigtransfer predict --model runs/flowers photo1.jpg photo2.png\n"
              "  bigtransfer predict --model runs/flowers ~/Pictures/garden --top-k 3 --json > predictions.json\n")
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_predict)


def _loaded(args, need_head: bool = True):
    """The model to run, as --backend, --precision and --device say."""
    from ..inference.predictor import load_predictor

    return load_predictor(args.model, device=args.device, resolution=args.resolution, need_head=need_head,
                          backend=args.backend, precision=args.precision)


def _say_how(args, predictor) -> None:
    """One line on stderr saying how the model ran (and why), once the work is done: a failure's
    message stays the only line."""
    if not args.quiet:
        print(f"bigtransfer: {predictor.describe()}", file=sys.stderr)


def _run_predict(args) -> int:
    from ..inference.images import predict

    predictor = _loaded(args)
    results, unreadable = predict(args.model, args.images, top_k=args.top_k, batch=args.batch,
                                  workers=args.workers, progress=not (args.quiet or args.json), predictor=predictor)
    if args.json:
        print(json.dumps({"predictions": results, "unreadable": [str(p) for p in unreadable]}, indent=2))
    else:
        for r in results:
            print(path_text(r["path"]))
            for rank, pred in enumerate(r["predictions"], start=1):
                print(f"  {rank}. {one_line(pred['label']):<30} {pred['probability']:7.2%}")
    if unreadable:
        print(f"bigtransfer: warning: {len(unreadable)} unreadable image(s): "
              f"{', '.join(map(path_text, unreadable[:5]))}", file=sys.stderr)
    _say_how(args, predictor)
    return 0


def _add_embed(sub) -> None:
    p = verb(sub, "embed", "Pre-logit features (the BiT representation) of images, to .npy + an index CSV.",
              "  bigtransfer embed --model BiT-M-R50x1 --resolution 224 ~/Pictures --out features/pictures\n"
              "  (writes features/pictures.npy [N, 2048] and features/pictures.csv: row,path)\n")
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output stem: OUT.npy and OUT.csv")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.npy/OUT.csv if they exist")
    p.set_defaults(run=_run_embed)


def _run_embed(args) -> int:
    from ..inference.images import embed
    from ..rundir import check_new_file

    for target in (args.out.with_suffix(".npy"), args.out.with_suffix(".csv")):
        check_new_file(target, overwrite=args.overwrite)  # before the model loads (and maybe exports)
    predictor = _loaded(args, need_head=False)
    result = embed(args.model, args.images, args.out, batch=args.batch, workers=args.workers,
                   progress=not args.quiet, overwrite=args.overwrite, predictor=predictor)
    print(f"wrote {path_text(result['features'])} {tuple(result['shape'])} and {path_text(result['index'])}")
    if result["unreadable"]:
        print(f"bigtransfer: warning: skipped {len(result['unreadable'])} unreadable image(s): "
              f"{', '.join(map(path_text, result['unreadable'][:5]))}", file=sys.stderr)
    _say_how(args, predictor)
    return 0


def _add_export(sub) -> None:
    p = verb(sub, "export", "Export a model to ONNX (checked with onnxruntime; optionally int8), a Triton model "
                            "repository, TorchScript, torch.export (.pt2), a timm state dict or a transformers folder "
                            "(each checked with that library).",
              "  bigtransfer export --model runs/flowers --out flowers.onnx\n"
              "  bigtransfer export --model runs/flowers --out flowers-int8.onnx --quantize int8 "
              "--calibration ~/data/flowers/train\n"
              "  bigtransfer export --model runs/flowers --format triton --out model_repository\n"
              "  bigtransfer export --model runs/flowers --format torchscript --out flowers.pt\n"
              "  bigtransfer export --model runs/flowers --format pt2 --out flowers.pt2\n"
              "  bigtransfer export --model runs/flowers --format timm --out flowers_timm.safetensors\n"
              "  bigtransfer export --model runs/flowers --format transformers --out flowers-bit/\n"
              "loading the last two (K = the number of classes):\n"
              "  timm.create_model('resnetv2_50x1_bit', pretrained=True, num_classes=K,\n"
              "                    pretrained_cfg_overlay=dict(file='flowers_timm.safetensors', num_classes=K))\n"
              "  transformers.BitForImageClassification.from_pretrained('flowers-bit')\n")
    p.add_argument("--model", required=True,
                   help="run directory, .safetensors file, released name, .npz, or a timm/transformers checkpoint")
    p.add_argument("--out", type=Path, required=True,
                   help="output file (a folder for --format transformers and triton: new, empty, or an earlier export)")
    p.add_argument("--format", choices=("onnx", "torchscript", "pt2", "timm", "transformers", "triton"),
                   default="onnx")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: from the model's metadata)")
    p.add_argument("--no-check", action="store_true", help="skip comparing the export with PyTorch / the library")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and OUT.json) if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    q = p.add_argument_group("int8 (--format onnx or triton)")
    q.add_argument("--quantize", choices=("int8",), default=None,
                   help="ONNX Runtime static quantization (QDQ, per-channel int8 kernels), calibrated on --calibration")
    q.add_argument("--calibration", default=None, metavar="DATA",
                   help="images to calibrate on: a folder or image files, or a --data source (its training split)")
    q.add_argument("--calibration-images", type=int, default=None, metavar="N",
                   help="calibrate on at most N images, evenly spread (default 256)")
    q.add_argument("--data", default=None,
                   help="labelled images to measure the top-1 change on (default: the run's own test split)")
    q.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help="refuse (and write nothing) if int8 loses more top-1 than this (default 1 point)")
    t = p.add_argument_group("Triton (--format triton)")
    t.add_argument("--name", default=None, help="the model's name in the repository (default: the run's name)")
    t.add_argument("--max-batch", type=int, default=None, help="max_batch_size for dynamic batching (default 32)")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from ..sharing.export import export

    extra = {key: value for key, value in (("calibration_images", args.calibration_images),
                                           ("max_drop", args.max_drop), ("max_batch", args.max_batch))
             if value is not None}
    report = export(args.model, args.out, args.format, resolution=args.resolution, check=not args.no_check,
                    overwrite=args.overwrite, quantize=args.quantize, calibration=args.calibration, data=args.data,
                    name=args.name, progress=not args.quiet, **extra)
    if args.format in ("timm", "transformers"):
        check = report.get("check", "not checked (--no-check)")
        diff = report.get("max_relative_diff")
        print(f"wrote {report['path']} ({args.format}, {report['architecture']}, {report['num_classes']} classes; "
              f"{check}" + (f"; max relative logit difference {diff:.2e}" if diff is not None else "") + ")")
        return 0
    diff = report.get("max_abs_diff_vs_pytorch")
    print(f"wrote {report['path']} ({args.format}; input {report['input']}"
          + (f"; max |diff| vs PyTorch {diff:.2e}" if diff is not None else "") + ")")
    quantization = report.get("quantization")
    if quantization:
        print(f"int8: top-1 {quantization['top1_int8']:.2%} vs fp32 {quantization['top1_fp32']:.2%} "
              f"({quantization['top1_change_points']:+.2f} points) on {quantization['evaluated_images']} images of "
              f"{quantization['evaluated_on']}")
    return 0


def _add_push(sub) -> None:
    p = verb(sub, "push", "Share a finished run on the Hugging Face hub: a model card plus the model for "
                          "transformers (top level) and timm (timm/); --to-folder / --dry-run write it without uploading.",
              "  bigtransfer push runs/flowers alice/bit-flowers --dry-run      # writes ./bit-flowers, no upload\n"
              "  bigtransfer push runs/flowers alice/bit-flowers --to-folder hub/bit-flowers\n"
              "  bigtransfer push runs/flowers alice/bit-flowers --private      # uploads (hf auth login / HF_TOKEN)\n")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run (final.safetensors, config.json, "
                                                                 "summary.json)")
    p.add_argument("repo", metavar="REPO", help="the hub repository, OWNER/NAME")
    p.add_argument("--to-folder", type=Path, default=None, metavar="DIR",
                   help="write the repository's files here and do not upload")
    p.add_argument("--dry-run", action="store_true", help="write the files (to ./NAME unless --to-folder) and do not "
                                                          "upload")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", default=None, help="commit message (default: 'bigtransfer push')")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier push in --to-folder")
    p.add_argument("--no-check", action="store_true", help="skip loading the files with transformers and timm")
    p.set_defaults(run=_run_push)


def _run_push(args) -> int:
    from ..sharing.push import push

    result = push(args.run_dir, args.repo, to_folder=args.to_folder, dry_run=args.dry_run, private=args.private,
                  message=args.message, overwrite=args.overwrite, check=not args.no_check)
    for library, check in result["checks"].items():
        print(f"{library}: {check.get('check')}" + (f"; max relative logit difference "
                                                     f"{check['max_relative_diff']:.2e}" if "max_relative_diff"
                                                     in check else ""))
    if result["uploaded"]:
        print(f"uploaded {len(result['files'])} files to {args.repo}: {result['url']}")
    else:
        print(f"wrote {result['folder']} ({', '.join(result['files'])}); not uploaded")
    return 0


def _add_serve(sub) -> None:
    p = verb(sub, "serve", "Answer HTTP requests with a model: POST /predict (top-k classes), POST /embed "
                           "(pre-logits), GET / (a page to try an image), /health, /metrics, /openapi.json.",
             "  bigtransfer serve runs/flowers                     # http://127.0.0.1:8000, batches of up to 16\n"
             "  curl -F image=@cat.jpg 'http://127.0.0.1:8000/predict?top_k=3'\n"
             "  curl -F image=@a.jpg -F image=@b.jpg http://127.0.0.1:8000/embed\n"
             "  bigtransfer serve runs/flowers --max-batch 32 --batch-timeout-ms 5 --port 0   # any free port\n"
             "  bigtransfer serve runs/flowers --host 0.0.0.0 --api-key-file ~/.config/flowers.key\n"
             "  curl -H \"Authorization: Bearer $(cat ~/.config/flowers.key)\" -F image=@cat.jpg HOST:8000/predict\n"
             "stateless: run replicas behind any load balancer (benchmarks/serve_replicas.py shows two)\n")
    p.add_argument("model", metavar="RUN_OR_WEIGHTS",
                   help="run directory, .safetensors file, released name or authors' .npz")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                                                        "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--resolution", type=positive_int, default=None, help="input size (default: from the model's "
                                                                         "metadata)")
    add_runtime_args(p)
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=positive_int, default=16, help="images run through the model at once "
                                                                      "(default: %(default)s; 1 turns batching off)")
    g.add_argument("--batch-timeout-ms", type=float, default=10.0,
                   help="how long a batch's first image waits for others (default: %(default)s)")
    g.add_argument("--workers", type=positive_int, default=1,
                   help="batches computed at the same time, sharing the model and the cores (default: %(default)s)")
    g.add_argument("--max-queue", type=positive_int, default=128,
                   help="requests in progress at once; more are answered 503 with Retry-After "
                        "(default: %(default)s)")
    g.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest request body, refused while it is read (default: %(default)s)")
    g.add_argument("--max-images", type=positive_int, default=16, help="images in one request (default: "
                                                                       "%(default)s)")
    g.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body still arriving after this is refused with 408, so slow clients cannot "
                        "hold the --max-queue places (default: %(default)s)")
    g.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long the requests in flight may take to finish (default: %(default)s)")
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="a file holding one key; requests to /predict, /embed and /metrics must then send "
                        "'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(run=_run_serve)


def serve_options(args):
    """ServeOptions from `bigtransfer serve`'s arguments."""
    from ..serving.options import ServeOptions

    return ServeOptions(model=args.model, host=args.host, port=args.port, device=args.device,
                        backend=args.backend, precision=args.precision,
                        resolution=args.resolution, max_batch=args.max_batch,
                        batch_timeout_ms=args.batch_timeout_ms, workers=args.workers, max_queue=args.max_queue,
                        max_upload_mb=args.max_upload_mb, max_images=args.max_images,
                        read_timeout_s=args.read_timeout,
                        api_key_file=args.api_key_file, grace_s=args.grace, access_log=args.access_log)


def _run_serve(args) -> int:
    try:
        from ..serving.server import serve
    except ImportError as err:
        raise BigTransferError(f"bigtransfer serve needs {err.name}, which installing bigtransfer brings; "
                               "this environment lacks it: pip install 'fastapi' 'uvicorn[standard]' "
                               "'python-multipart' 'prometheus_client'") from None
    serve(serve_options(args))
    return 0


VERBS = (_add_evaluate, _add_predict, _add_embed, _add_export, _add_push, _add_serve,)
