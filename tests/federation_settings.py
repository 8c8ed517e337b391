"""Configuration overrides that many federated tests share."""

#: A federation without DP-SGD, which each hospital's policy must allow or it refuses the run.
WITHOUT_DP = ("privacy.dp=false", "hospital.dp_required=false")
