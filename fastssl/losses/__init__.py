"""nn.Module losses (with their state) built on fastssl.ops."""
