"""The digits demo: its data (`data`), its teacher's shapes, vocabulary and training (`teacher`)."""
