"""Near-duplicates of downstream test images in an upstream collection (paper Supp. C).

A copy found on the web is the same picture after a few edits: rescaled and back, moved by a
pixel, brighter, re-encoded as JPEG, converted to grey or to RGB, renamed. A network trained on
classes cannot tell such a copy from another image of its class, so here the network only helps
to *propose* candidates, and pixels decide:

1. every image becomes a grey thumbnail of one canonical size (pixels.py), and, with a model, an
   embedding from one of its stages (features.py);
2. candidates for each test image: identical thumbnails, the nearest pixel descriptors (queried
   at nine one-pixel shifts) and the nearest embeddings, from faiss indexes that are exact for
   small collections and HNSW graphs for millions of images (candidates.py);
3. each candidate pair is verified on aligned pixels with a small shift and scale search and a
   residual tolerance defined on the canonical size, so it means the same for 28 px and 500 px
   images (verify.py);
4. a self-test plants edited copies of a sample of the test images among the upstream ones (in
   memory), measures what steps 2-3 find of them, per edit, and drops them (selftest.py, edits.py);
5. pairs.csv, upstream_filtered.csv, a contact sheet grouped by deciding stage, summary.json
   (report.py); pipeline.py runs it all.
"""

from .edits import EDITS
from .pipeline import DedupOptions, run_dedup
from .planted import planted_precision_recall, write_planted_set
from .verify import Tolerance

__all__ = ["EDITS", "DedupOptions", "Tolerance", "planted_precision_recall", "run_dedup",
           "write_planted_set"]
