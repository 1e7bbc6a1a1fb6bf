"""Every choice list of `compress quantize` (method, allocator, measure, backend, granularity, embeddings): the CLI's
help, the request check and the recipe read these."""

from __future__ import annotations

from compress.choices import Choices

METHOD = Choices("--method", {"rtn": "round to nearest", "hqq": "data-free zero-point optimisation; --asymmetric",
                              "gptq": "Hessian from calibration data"})
ALLOCATOR = Choices("--allocator", {"dp": "exact knapsack on measured KL",
                                    "rank": "the seed paper's ordering by --rank-by, from --scores"})
MEASURE = Choices("--measure", {"full": "measure KL for every unit × candidate",
                                "fast": "measure each unit once, at the candidate nearest the budget, and scale the "
                                        "others by weight error energy (~4× fewer measurements)",
                                "fisher": "predict every unit × candidate as ½ Σ F ΔW² (diagonal Fisher from one "
                                          "forward and backward per calibration window, block by block): no replay; "
                                          "the default when the model is streamed"})
BACKEND = Choices("--backend", {"packed": "our packed codes, any width, reloadable with `compress load`",
                                "bnb": "bitsandbytes modules for PyTorch: 8-bit -> Linear8bitLt, 4-bit -> Linear4bit "
                                       "nf4, other widths stay float; bitsandbytes quantizes by itself"})
GRANULARITY = Choices("--granularity", {"block": "one width per block", "linear": "one width per Linear"})
EMBEDDINGS = Choices("--embeddings", {"keep": "the embedding (and tied head) stay float",
                                      "quantize": "quantize them too"})
