"""``fedtransfer import-model``: a pretrained torchvision or timm model from a local weights file, as a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli.console import console
from common.errors import ConfigurationError

COMMANDS = ("import-model",)

NATIVE = "native"


def _resize(text: str, arch: str) -> int:
    from common.model.importing import native_size

    if text == NATIVE:
        return native_size(arch)
    try:
        side = int(text)
    except ValueError:
        side = -1
    if side < 0:
        raise ConfigurationError(f"--resize {text!r} must be '{NATIVE}', 0 (keep the data's size) or a side in pixels")
    return side


def _shape_and_classes(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[str, ...]]:
    from common.model.importing import class_list, parse_shape

    if args.scenario:
        if args.input_shape or args.classes:
            raise ConfigurationError("give either --scenario or --input-shape and --classes, not both")
        from common.data.scenarios import load_scenario

        scenario = load_scenario(args.scenario, data_dir=Path(args.data_dir) if args.data_dir else None)
        return tuple(scenario.input_shape), tuple(scenario.class_names)
    if not args.input_shape or not args.classes:
        raise ConfigurationError("say what the sites hold: --scenario NAME, or --input-shape C,H,W and --classes A,B")
    return parse_shape(args.input_shape), class_list(args.classes.split(","))


def _cmd_import(args: argparse.Namespace) -> int:
    from common.model.backbones import split_arch, torchvision_spec
    from common.model.importing import ImportRequest, import_model, parse_floats
    from common.model.transfer import TransferPolicy

    family, _ = split_arch(args.arch)
    if family != "timm":
        torchvision_spec(args.arch)  # an unknown name fails here, listing the known ones
    TransferPolicy.parse(args.transfer_policy)
    input_shape, classes = _shape_and_classes(args)
    request = ImportRequest(
        arch=args.arch,
        weights=Path(args.weights),
        input_shape=input_shape,
        class_names=classes,
        channels=args.channels or "",
        resize=_resize(args.resize, args.arch),
        mean=parse_floats(args.mean, "--mean"),
        std=parse_floats(args.std, "--std"),
        groupnorm_stages=tuple(s.strip() for s in args.groupnorm_stages.split(",") if s.strip()),
        licence=args.licence,
        pretraining_data=args.pretraining_data,
        default_transfer_policy=args.transfer_policy,
        seed=args.seed,
    )
    card = import_model(request, Path(args.out))
    console.print(
        f"Wrote {args.out}: {card.arch} for {', '.join(card.class_names)} (input {tuple(card.input_shape)}), "
        f"weights file sha256 {card.lineage['weights_file_sha256'][:16]}..., default transfer policy "
        f"{card.default_transfer_policy}\n{card.preprocessing}"
    )
    if not card.licence:
        console.print("No licence recorded: pass --licence with the weights' licence terms.")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "import-model",
        help="import a pretrained torchvision or timm model from a local weights file",
        description=(
            "Build a pretrained architecture, load a local weights file into it (a torchvision .pth state dict read "
            "with torch.load(weights_only=True), or .safetensors), give it a new head for the classes and an input "
            "adapter (channels, resize, normalisation), and write model.safetensors + model-card.json. Nothing is "
            "downloaded."
        ),
    )
    cmd.add_argument(
        "--arch",
        required=True,
        help="torchvision:resnet18, torchvision:resnet50, torchvision:densenet121, torchvision:efficientnet_b0, "
        "torchvision:mobilenet_v3_small, or timm:NAME (with the optional extra fedtransfer[timm])",
    )
    cmd.add_argument("--weights", required=True, help="the weights file: .pth/.pt (a state dict) or .safetensors")
    cmd.add_argument("--out", required=True, help="checkpoint directory to write")
    cmd.add_argument("--scenario", default="", help="take the input shape and classes from this scenario")
    cmd.add_argument("--data-dir", default="", help="folder with the scenario's data files (see docs/data.md)")
    cmd.add_argument("--input-shape", default="", help="the sites' image shape C,H,W, e.g. 1,28,28 (no --scenario)")
    cmd.add_argument("--classes", default="", help="class names, comma-separated, e.g. normal,pneumonia")
    cmd.add_argument(
        "--channels",
        choices=("repeat", "sum", "native"),
        default=None,
        help="grey images: repeat to 3 channels (default) or sum the first convolution's weights; native: "
        "the data has 3 channels",
    )
    cmd.add_argument(
        "--resize",
        default=NATIVE,
        help="resize images to this side: 'native' (the model's pretraining size, 224 for torchvision; default), "
        "0 to keep the data's size, or pixels",
    )
    cmd.add_argument("--mean", default="", help="normalisation mean per model channel (default ImageNet's)")
    cmd.add_argument("--std", default="", help="normalisation std per model channel (default ImageNet's)")
    cmd.add_argument(
        "--groupnorm-stages",
        default="",
        help="stages whose BatchNorm becomes a fresh GroupNorm (e.g. layer4); others keep fixed pretrained statistics",
    )
    cmd.add_argument("--transfer-policy", default="head", help="the card's default transfer policy (default: head)")
    cmd.add_argument("--licence", default="", help="the weights' licence, recorded in the model card")
    cmd.add_argument("--pretraining-data", default="", help="what the weights were pretrained on, e.g. ImageNet-1k")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the new head's initialisation (default: 0)")
    cmd.set_defaults(func=_cmd_import)
