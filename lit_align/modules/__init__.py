"""LightningModules: DPOModule, ProbeModule, RewardModule, GRPOModule on the shared AlignModule base."""
