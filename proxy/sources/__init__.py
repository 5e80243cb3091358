"""Where keys come from: one module per kind of source, behind one small interface."""
