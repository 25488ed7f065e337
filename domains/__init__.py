"""Domain packs: one package per scientific domain, each with the same modules."""
