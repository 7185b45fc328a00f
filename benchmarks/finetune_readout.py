"""A centroid readout of a fine-tune's own embeddings, per LOCO fold: does the probe's winning head (cosine to
each MoA's mean profile, compounds weighted alike) call treatments better from fine-tuned features than the
fine-tune's trained softmax head? (issue 29 item 3; measured in benchmarks/RESULTS.md, 'Fine-tune readouts')

    cellmorph cv --data CACHE --model tf_efficientnet_lite0 --init imagenet --cv loco --epochs 5 \
        --ensemble-seeds 1 --keep-checkpoints all --out RUN
    python benchmarks/finetune_readout.py RUN [THREADS] [none|dihedral]
    python benchmarks/reaggregate.py RUN   # and RUN/readout_centroid-<tta>.parquet scored the same way

For every fold it rebuilds the fold's network from its saved weights (``--keep-checkpoints all``), embeds every
treated tile (the backbone's pooled features before the classifier; TTA ``none`` by default here, 8× cheaper),
fits :class:`cellmorph.cv.probe.CentroidHead` on the fold's training compounds (temperature by the same inner
group-kfold) and writes the held-out tiles' probabilities to ``RUN/readout_centroid-<tta>.parquet``.
"""
import sys, json, numpy as np, pandas as pd, torch, warnings; warnings.filterwarnings('ignore')
from pathlib import Path
from cellmorph.cv.rundir import RunDir
from cellmorph.models import create_model
from cellmorph.datasets import InputPipeline, iterate_batches
from cellmorph.models.spec import InputSpec
from cellmorph.cache import TileCache
from cellmorph.augment import tta_views
from cellmorph.cv.probe import CentroidHead, choose_centroid_temperature
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
run = Path(sys.argv[1]); rd = RunDir(run)
tta = sys.argv[3] if len(sys.argv) > 3 else 'none'
cfg = rd.read_config(); cache = TileCache(Path(cfg['data'])); idx = cache.index
rows = np.flatnonzero(~idx.Metadata_IsControl.to_numpy())
meta = idx.iloc[rows].reset_index(drop=True)
out = []
for fold_path in sorted((run / 'folds').iterdir(), key=lambda p: int(p.name)):
    fold = int(fold_path.name)
    fj = json.loads((fold_path / 'fold.json').read_text())
    if not fj.get('test_compounds'):
        continue
    cache_file = run / f'ftfeats{fold}-{tta}.npy'
    st = rd.fold_state(fold); spec = InputSpec.from_record(st['input']); classes = list(st['classes'])
    if cache_file.exists():
        feats = np.load(cache_file)
    else:
        m = create_model(st['model_name'], len(classes), init='xavier', in_chans=spec.channels)
        m.load_state_dict(st['model']); m.eval()
        pipe = InputPipeline.from_spec(spec).eval()
        feats = np.zeros((len(rows), m.num_features), np.float32)
        with torch.inference_mode():
            for tiles, pos in iterate_batches(cache, rows, 64):
                x = pipe(tiles); acc = 0
                for v in tta_views(x, tta):
                    acc = acc + m.forward_head(m.forward_features(v), pre_logits=True)
                feats[pos.numpy()] = (acc / (8 if tta == 'dihedral' else 1)).numpy()
        np.save(cache_file, feats)
    test = meta.Metadata_Compound.isin(fj['test_compounds']).to_numpy()
    y = meta.Metadata_MoA.map({c: i for i, c in enumerate(classes)}).to_numpy()
    T, _ = choose_centroid_temperature(feats[~test], y[~test], meta[~test], 0)
    h = CentroidHead.fit(feats[~test], y[~test], meta[~test], T)
    P = np.zeros((test.sum(), len(classes))); P[:, h.classes_] = h.predict_proba(feats[test])
    fr = meta[test].reset_index(drop=True).copy()
    for k, c in enumerate(classes): fr['prob_' + c] = P[:, k]
    out.append(fr); print('fold', fold, fj['test_compounds'], 'T', T, flush=True)
pd.concat(out).to_parquet(run / f'readout_centroid-{tta}.parquet')
