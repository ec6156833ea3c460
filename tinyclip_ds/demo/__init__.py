"""The digits demo's teacher: its shapes, vocabulary and training (`teacher`); the digits themselves
are a data source like any other, `tinyclip_ds.data.digits`."""
