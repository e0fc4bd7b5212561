"""fmgs.export: bake a trained avatar into an engine bundle (later issue)."""
