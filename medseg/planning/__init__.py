"""Planning a run the nnU-Net way: the rules (:mod:`.planner`), the dataset fingerprint and plan
(:mod:`.fingerprint`), the editable plan file (:mod:`.plan_file`) and the plan of one training run
(:mod:`.run_plan`)."""
