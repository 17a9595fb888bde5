# Packer >= 1.7 installs builders as plugins: `packer init worker_image/image` fetches this one.
# (Debian's packer 1.6.6, used to validate batchvm-worker.pkr.hcl here, has it built in and does
# not know this block; see README.md.)
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    googlecompute = {
      source  = "github.com/hashicorp/googlecompute"
      version = ">= 1.1.0"
    }
  }
}
