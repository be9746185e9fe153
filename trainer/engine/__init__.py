"""DeepSpeed itself: the process group and the engine (build.py), the DeepSpeed JSON (ds_config.py),
Muon's batched updates under ZeRO (muon.py) and the pre-flight checks (doctor.py). DeepSpeed is
imported here and in trainer/checkpoint/ only.
"""
