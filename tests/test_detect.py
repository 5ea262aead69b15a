"""Tests of instsim.detect: targets, loss (incl. double backward), decoding, COCO eval, training, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import grad, vmap

from instsim.detect import (
    DetectionTargets,
    SHAPE_NAMES,
    DetectorConfig,
    DetectorTrainingError,
    box_iou,
    build_detector,
    decode,
    detection_loss,
    encode_targets,
    evaluate_coco,
    finetune,
    load_coco,
    load_detector,
    make_coco_gt,
    make_shapes_dataset,
    nms,
    predict,
    save_detector,
    train_detector,
)
from instsim.errors import ConfigError, InputError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core CPU, oversubscribed OpenMP threads are many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def shapes():
    return make_shapes_dataset(400, seed=2)


# ---------------------------------------------------------------- config


def test_config_roundtrip_and_errors():
    cfg = DetectorConfig(width=8, dilations=(1, 2), steps=5)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DetectorConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError) as e:
        DetectorConfig.from_dict({"widht": 8}, source="cfg.yaml")
    assert e.value.file == "cfg.yaml" and e.value.field == "detector.widht"
    with pytest.raises(ConfigError) as e:
        DetectorConfig(image_size=66)
    assert e.value.field == "detector.image_size"


# ---------------------------------------------------------------- targets / decode


def test_encode_decode_round_trip(shapes):
    _, boxes, labels = shapes
    boxes, labels = boxes[:16], labels[:16]
    t = encode_targets(boxes, labels, 64, 3, stride=4)
    assert t.heatmap.shape == (16, 3, 16, 16) and t.size.shape == (16, 2, 16, 16) and t.mask.shape == (16, 1, 16, 16)
    assert float(t.heatmap.max()) == 1.0 and float(t.heatmap.min()) == 0.0
    assert t.num_objects.tolist() == [float(len(b)) for b in boxes]
    dets = decode(t.heatmap, t.size, t.offset, stride=4, score_threshold=0.5, max_detections=20, nms_iou=1.0)
    for det, b, lb in zip(dets, boxes, labels):
        assert len(det.boxes) == len(b)
        iou = box_iou(b, det.boxes)
        best = iou.argmax(dim=1)
        assert (iou.max(dim=1).values > 0.9).all()
        assert torch.equal(det.labels[best], lb)


def test_encode_targets_clips_and_validates():
    t = encode_targets([torch.tensor([[-10.0, 50.0, 20.0, 30.0], [70.0, 0.0, 5.0, 5.0]])], [torch.tensor([1, 2])], 64, 3)
    assert t.num_objects.tolist() == [1.0]  # the second box lies outside the image
    assert float(t.heatmap[0, 1].max()) == 1.0 and float(t.heatmap[0, 2].max()) == 0.0
    with pytest.raises(ValueError, match="labels\\[0\\]"):
        encode_targets([torch.tensor([[1.0, 1.0, 5.0, 5.0]])], [torch.tensor([3])], 64, 3)
    with pytest.raises(ValueError, match="width or height"):
        encode_targets([torch.tensor([[1.0, 1.0, 0.0, 5.0]])], [torch.tensor([0])], 64, 3)
    empty = encode_targets([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], 64, 3)
    assert float(empty.heatmap.sum()) == 0 and float(empty.mask.sum()) == 0


def test_nms_class_wise():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [30, 30, 5, 5]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    assert nms(boxes, scores, labels, 0.5).tolist() == [0, 2, 3]


# ---------------------------------------------------------------- loss


def _tiny(dtype=torch.float64):
    cfg = DetectorConfig(image_size=16, width=4, head_width=4, dilations=(1,), seed=1)
    return build_detector(cfg).to(dtype), cfg


def test_loss_is_per_image(shapes):
    images, boxes, labels = shapes
    model = build_detector(DetectorConfig(width=8, head_width=8))
    t = encode_targets(boxes[:4], labels[:4], 64, 3)
    per = detection_loss(model, images[:4], t, reduction="none")
    assert per.shape == (4,)
    alone = detection_loss(model, images[2:3], t.index(slice(2, 3)))
    assert torch.allclose(per[2], alone, rtol=1e-5, atol=1e-6)
    assert torch.allclose(per.mean(), detection_loss(model, images[:4], t))


def test_double_backward_wrt_images(shapes):
    images, boxes, labels = shapes
    model = build_detector(DetectorConfig(width=8, head_width=8))
    x = images[:2].clone().requires_grad_(True)
    t = encode_targets(boxes[:2], labels[:2], 64, 3)
    params = [p for p in model.parameters()]
    g = torch.autograd.grad(detection_loss(model, x, t), params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    u = [torch.randn(p.shape, generator=gen) for p in params]
    (hx,) = torch.autograd.grad(sum((gi * ui).sum() for gi, ui in zip(g, u)), x)
    assert hx.shape == x.shape and torch.isfinite(hx).all() and float(hx.abs().max()) > 0


def test_double_backward_matches_finite_differences():
    model, cfg = _tiny()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    boxes = [torch.tensor([[2.0, 3.0, 8.0, 7.0]]), torch.tensor([[5.0, 1.0, 6.0, 9.0], [0.5, 8.0, 6.0, 6.0]])]
    t = encode_targets(boxes, [torch.tensor([0]), torch.tensor([1, 2])], 16, 3, dtype=torch.float64)
    params = list(model.parameters())
    u = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    v = torch.randn(x0.shape, generator=gen, dtype=torch.float64)

    def g_dot_u(x: torch.Tensor, create_graph: bool) -> torch.Tensor:
        g = torch.autograd.grad(detection_loss(model, x, t), params, create_graph=create_graph)
        return sum((gi * ui).sum() for gi, ui in zip(g, u))

    x = x0.clone().requires_grad_(True)
    (hx,) = torch.autograd.grad(g_dot_u(x, True), x)
    analytic = float((hx * v).sum())
    eps = 1e-6
    numeric = (float(g_dot_u(x0 + eps * v, False)) - float(g_dot_u(x0 - eps * v, False))) / (2 * eps)
    assert analytic != 0.0
    assert math.isclose(analytic, numeric, rel_tol=1e-4, abs_tol=1e-7), (analytic, numeric)


def test_detection_loss_functional_params(shapes):
    images, boxes, labels = shapes
    model = build_detector(DetectorConfig(width=8, head_width=8))
    t = encode_targets(boxes[:2], labels[:2], 64, 3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    a = detection_loss(model, images[:2], t)
    b = detection_loss(model, images[:2], t, params=params)
    assert torch.allclose(a, b)
    params = {k: v * 0.5 for k, v in params.items()}
    assert not torch.allclose(a, detection_loss(model, images[:2], t, params=params))


def test_per_image_grads_with_torch_func(shapes):
    """torch.func.vmap(grad(...)) over images gives per-image parameter gradients summing to the batch gradient."""
    images, boxes, labels = shapes
    model = build_detector(DetectorConfig(width=8, head_width=8))
    t = encode_targets(boxes[:3], labels[:3], 64, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, tt):
        return detection_loss(model, x[None], DetectionTargets(*(a[None] for a in tt)), params=p)

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, images[:3], t)
    total = torch.autograd.grad(detection_loss(model, images[:3], t, reduction="sum"), list(model.parameters()))
    for (name, g_per), g in zip(per.items(), total):
        assert g_per.shape == (3, *g.shape)
        assert torch.allclose(g_per.sum(0), g, rtol=1e-4, atol=1e-4), name


# ---------------------------------------------------------------- COCO


def test_coco_perfect_and_empty_detections(shapes, tmp_path):
    _, boxes, labels = shapes
    gt = make_coco_gt(boxes[:20], labels[:20], 64, SHAPE_NAMES)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    r = evaluate_coco(gt, perfect)
    assert r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
    assert set(r["per_class"]) == set(SHAPE_NAMES)
    assert all(c["AP"] == pytest.approx(1.0) for c in r["per_class"].values() if c["num_gt"])
    assert "Average Precision" in r["log"]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    r0 = evaluate_coco(path, [])
    assert r0["AP"] == 0.0 and r0["AP50"] == 0.0 and r0["num_detections"] == 0
    det_path = tmp_path / "dets.json"
    det_path.write_text(json.dumps(perfect))
    assert evaluate_coco(path, det_path)["AP50"] == pytest.approx(1.0)


def _gt_one():
    return make_coco_gt([torch.tensor([[1.0, 2.0, 10.0, 12.0]])], [torch.tensor([0])], 64, SHAPE_NAMES)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.update(annotations=[]), "annotations"),
        (lambda d: d.pop("images"), "images"),
        (lambda d: d.update(categories=[]), "categories"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0].bbox"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "annotations[0].bbox"),
        (lambda d: d["annotations"][0].update(category_id=42), "annotations[0].category_id"),
        (lambda d: d["annotations"][0].update(image_id=7), "annotations[0].image_id"),
        (lambda d: d["annotations"][0].pop("id"), "annotations[0].id"),
    ],
)
def test_load_coco_rejects_malformed(tmp_path, mutate, field):
    d = _gt_one()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(InputError) as e:
        load_coco(path)
    assert e.value.file == str(path) and e.value.field == field
    assert str(path) in str(e.value) and field in str(e.value)
    with pytest.raises(InputError):
        evaluate_coco(path, [])


def test_load_coco_not_json_and_missing(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_coco(path)
    with pytest.raises(InputError, match="file not found"):
        load_coco(tmp_path / "missing.json")


def test_bad_detections_rejected(tmp_path):
    gt = _gt_one()
    with pytest.raises(InputError) as e:
        evaluate_coco(gt, [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1], "score": 0.5}])
    assert e.value.field == "[0].category_id"


# ---------------------------------------------------------------- training


def test_training_reaches_ap50(shapes):
    """Short training on synthetic shapes (train and test from the same distribution)."""
    images, boxes, labels = shapes
    cfg = DetectorConfig(width=16, head_width=16, steps=300, batch_size=16, lr=6e-3)
    model = train_detector(images[:300], boxes[:300], labels[:300], cfg, progress=False)
    dets = predict(model, images[300:])
    assert len(dets) == 100
    r = evaluate_coco(make_coco_gt(boxes[300:], labels[300:], 64, SHAPE_NAMES), dets)
    assert r["AP50"] >= 0.7, r


def _tiny_train_cfg(**kw):
    return DetectorConfig(image_size=32, width=4, head_width=4, dilations=(1,), batch_size=4, steps=9,
                          warmup_steps=2, checkpoint_every=3, **kw)


def test_resume_gives_identical_weights(tmp_path):
    images, boxes, labels = make_shapes_dataset(10, image_size=32, min_size=6, max_size=14, seed=5)
    cfg = _tiny_train_cfg()
    full = train_detector(images, boxes, labels, cfg, progress=False)
    ck = tmp_path / "det.pt"
    train_detector(images, boxes, labels, cfg, checkpoint_path=ck, max_steps=4, progress=False)
    assert torch.load(ck, weights_only=True)["step"] == 4
    msgs: list[str] = []
    resumed = train_detector(images, boxes, labels, cfg, checkpoint_path=ck, progress=False, log=msgs.append)
    assert any("resumed" in m for m in msgs)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.load(ck, weights_only=True)["complete"]
    loaded = load_detector(ck)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), full.state_dict().values()))
    # a changed config is refused, naming the checkpoint and the key
    with pytest.raises(ConfigError) as e:
        train_detector(images, boxes, labels, _tiny_train_cfg(lr=1e-3), checkpoint_path=ck, progress=False)
    assert e.value.file == str(ck) and e.value.field == "config.lr"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine runs it)")
def test_training_on_the_gpu_follows_the_cpu_run():
    images, boxes, labels = make_shapes_dataset(10, image_size=32, min_size=6, max_size=14, seed=5)
    cfg = _tiny_train_cfg()
    runs = {}
    for device in ("cpu", "cuda"):
        history: list = []
        model = train_detector(images, boxes, labels, cfg, progress=False, history=history, device=device)
        assert next(model.parameters()).device.type == "cpu"  # handed back on the CPU, ready to save
        runs[device] = [h["loss"] for h in history]
    # the same batches and augmentations: the losses agree up to float rounding over a few steps
    assert runs["cuda"] == pytest.approx(runs["cpu"], rel=1e-3)


def test_non_finite_loss_raises_and_keeps_checkpoint(tmp_path):
    images, boxes, labels = make_shapes_dataset(8, image_size=32, min_size=6, max_size=14, seed=6)
    cfg = _tiny_train_cfg()
    ck = tmp_path / "det.pt"
    train_detector(images, boxes, labels, cfg, checkpoint_path=ck, max_steps=3, progress=False)
    bad = images.clone()
    bad[:] = float("nan")
    with pytest.raises(DetectorTrainingError, match="diverged"):
        train_detector(bad, boxes, labels, cfg, checkpoint_path=tmp_path / "other.pt", progress=False)
    assert not (tmp_path / "other.pt").exists()
    assert torch.load(ck, weights_only=True)["step"] == 3


def test_finetune_and_save_load(shapes, tmp_path):
    images, boxes, labels = shapes
    model = build_detector(DetectorConfig(width=8, head_width=8))
    t = encode_targets(boxes[:32], labels[:32], 64, 3)
    with torch.no_grad():
        before = float(detection_loss(model, images[:32], t))
    hist: list[dict] = []
    out = finetune(model, images[:32], boxes[:32], labels[:32], steps=15, lr=5e-3, batch_size=16, history=hist)
    assert out is model and len(hist) == 15
    with torch.no_grad():
        after = float(detection_loss(model, images[:32], t))
    assert after < before
    save_detector(model, tmp_path / "m.pt")
    again = load_detector(tmp_path / "m.pt")
    assert again.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    with pytest.raises(InputError):
        (tmp_path / "junk.pt").write_bytes(b"junk")
        load_detector(tmp_path / "junk.pt")
