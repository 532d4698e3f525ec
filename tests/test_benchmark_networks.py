"""The same-run PyTorch comparison of `benchmarks/networks.py`: what it sends the twin and how it
pairs the figures (the timing itself needs torch and is not a test)."""

import json

from benchmarks import networks
from uad_jax.networks.ddpmpp import DDPMpp, PlannedModule


def test_twin_spec_is_json_and_carries_the_whole_plan():
  model = DDPMpp(image_size=16, nf=8, ch_mult=(1, 2), num_res_blocks=(1, 1),
                 attn_resolutions=(8,), attn_emb_dim=8)
  spec = json.loads(json.dumps(networks.twin_spec(model)))
  assert [PlannedModule(**m) for m in spec["plan"]] == model.plan()
  assert (spec["nf"], spec["positional"], spec["rescale"], spec["attn_emb_dim"],
          spec["image_size"], spec["in_channels"]) == (8, True, True, 8, 16, 1)


def test_table_pairs_only_one_pass_training_and_network_forwards(capsys):
  isa = "CPU AVX-512; XLA uncapped"
  twin = {"what": "torch net", "isa": isa, "size": 224, "forward_slices_per_s": 8.0,
          "train_slices_per_s": 4.0}
  rows = [{"method": "andi", "isa": isa, "what": "train model", "slices_per_s": 2.0, "size": 224},
          {"method": "andi", "isa": isa, "what": "forward net", "slices_per_s": 12.0, "size": 224},
          dict(twin, method="andi"),
          {"method": "riad", "isa": isa, "what": "train riad", "slices_per_s": 0.3, "size": 224},
          dict(twin, method="riad"),
          {"method": "andi", "isa": "CPU AVX-512; XLA --xla_cpu_max_isa=AVX2",
           "what": "forward net", "slices_per_s": 9.0, "size": 224}]
  networks.print_table(rows)
  lines = capsys.readouterr().out.splitlines()[2:]

  def line(*words):
    return next(text for text in lines if all(w in text for w in words)).rstrip()

  assert line("andi", "uncapped", "train model").endswith("4.000     0.50x")    # 2 / 4
  assert line("andi", "uncapped", "forward net").endswith("8.000     1.50x")    # 12 / 8
  assert line("train riad").endswith("0.300")       # RIAD's step is 5 passes: no ratio
  assert line("max_isa", "forward net").endswith("9.000")   # no twin in that ISA: no ratio
