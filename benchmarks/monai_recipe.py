"""The MONAI recipe a user would write to segment one CT: the reference ``bench_vs_monai`` compares medseg with.

    python -m benchmarks.monai_recipe CT.nii.gz OUTDIR [--classes 7] [--threads 2] [--precision fp32|bf16|fp16]
                                     [--device cpu|cuda]

MONAI's own ``AttentionUnet`` with the default medseg channels (16..256, strides 2) and random weights, the
usual dictionary transforms (load, channel first, orient, resample to the 1.5 mm plan, body crop, CT window),
``sliding_window_inference`` (96×96×64 windows, batch 2, overlap 0.5, Gaussian), argmax, ``Invertd`` back to the
scan's grid (nearest neighbour on the label map: cheaper than inverting the probabilities) and ``SaveImaged``.
The body crop and the window are medseg's defaults (HU > -500, margin 2 within the image; -175..250 HU → 0..1),
so both sides see the same model grid and windows. Prints one ``RECIPE`` line of JSON with the stage times.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    import numpy as np
    import torch
    from monai import transforms as mt
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import AttentionUnet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = AttentionUnet(3, 1, args.classes, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    model = model.eval().to(device)
    pre = mt.Compose(
        [
            mt.LoadImaged("image", image_only=False),
            mt.EnsureChannelFirstd("image"),
            mt.Orientationd("image", axcodes="RAS"),
            mt.Spacingd("image", pixdim=(1.5, 1.5, 1.5), mode="bilinear"),
            mt.CropForegroundd(
                "image", source_key="image", select_fn=lambda x: x > -500, margin=2, allow_smaller=True
            ),
            mt.ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    post = mt.Compose(
        [
            mt.Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True),
            mt.SaveImaged(
                "pred",
                output_dir=args.out,
                output_postfix="seg",
                separate_folder=False,
                output_dtype=np.uint8,
            ),
        ]
    )
    t_setup = time.perf_counter()
    data = pre({"image": args.image})
    t_pre = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with torch.no_grad(), autocast:
        logits = sliding_window_inference(
            data["image"][None].to(device), (96, 96, 64), 2, model, overlap=0.5, mode="gaussian"
        )
    data["pred"] = torch.argmax(logits[0], dim=0, keepdim=True).to(torch.uint8).cpu()
    del logits
    t_net = time.perf_counter()
    post(data)
    t_post = time.perf_counter()
    seconds = {
        "imports_and_model": t_setup - t0,
        "preprocess": t_pre - t_setup,
        "network": t_net - t_pre,
        "invert_and_write": t_post - t_net,
        "model_grid": list(data["image"].shape[1:]),
    }
    print("RECIPE " + json.dumps(seconds), flush=True)


if __name__ == "__main__":
    main()
