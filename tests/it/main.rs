//! The integration tests, as one test binary (one link instead of one per file, and the
//! harness runs every test of every module in parallel). Each module was a file of its own
//! under `tests/`; `util` holds the helpers they share (running the binary, reading outputs)
//! and `oracle` the comparisons with the PyTorch golden files. See docs/testing.md.

mod oracle;
mod util;

mod bad_input;
mod check;
mod cli;
mod cnn_oracle;
mod conv_specs;
mod converge_layers;
mod crash;
mod data_order;
mod deep40;
mod gpt_oracle;
mod heldout_oracle;
mod hostile_inputs;
mod init;
mod inspect;
mod integration_accuracy;
mod integration_budget;
mod mlp_oracle;
mod plot;
mod report;
mod residual_bn;
mod resnet20;
mod resnet_oracle;
mod resume;
mod shard;
mod torch_formats;
mod tutorial;
