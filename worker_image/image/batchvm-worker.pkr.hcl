# The batchvm worker VM image: Debian 12, Docker, and the worker agent as a systemd service that
# runs this VM's one job at boot and powers the VM off. Nothing on it needs a login.
#
# Build (from the repository root; docs/gcp-setup.md has the whole sequence):
#   uv build --wheel -o worker_image/image/dist
#   uv build --wheel --package batchvm-agent -o worker_image/image/dist
#   packer init worker_image/image            # Packer >= 1.7: fetches the googlecompute plugin
#   packer build -var project_id=MY_PROJECT worker_image/image
#
# Then: batchvm setup --vm-image projects/MY_PROJECT/global/images/family/batchvm-worker ...

variable "project_id" {
  type        = string
  description = "Project the image is built in and stored in."
}

variable "zone" {
  type    = string
  default = "us-central1-a"
}

variable "image_family" {
  type        = string
  default     = "batchvm-worker"
  description = "Instance templates point at the family, so they always get the newest image."
}

variable "source_image_family" {
  type    = string
  default = "debian-12"
}

variable "machine_type" {
  type    = string
  default = "e2-standard-2"
}

variable "disk_size_gb" {
  type    = number
  default = 20
}

variable "wheels_dir" {
  type        = string
  default     = ""
  description = "Folder with the airflow_batchvm and batchvm_agent wheels (default: dist/ beside this file)."
}

variable "registry_hosts" {
  type        = string
  default     = "gcr.io us-docker.pkg.dev europe-docker.pkg.dev asia-docker.pkg.dev"
  description = "Registries whose private images the VM's service account pulls (space-separated hosts)."
}

variable "network" {
  type    = string
  default = "default"
}

variable "subnetwork" {
  type    = string
  default = ""
}

variable "omit_external_ip" {
  type        = bool
  default     = false
  description = "Build without a public IP (then the subnet needs Cloud NAT for apt and pip)."
}

locals {
  wheels_dir = var.wheels_dir != "" ? var.wheels_dir : "${path.root}/dist"
  stamp      = formatdate("YYYYMMDD-hhmmss", timestamp())
}

source "googlecompute" "worker" {
  project_id              = var.project_id
  zone                    = var.zone
  source_image_family     = var.source_image_family
  source_image_project_id = ["debian-cloud"]
  machine_type            = var.machine_type
  disk_size               = var.disk_size_gb
  network                 = var.network
  subnetwork              = var.subnetwork
  omit_external_ip        = var.omit_external_ip
  use_internal_ip         = var.omit_external_ip

  image_name        = "${var.image_family}-${local.stamp}"
  image_family      = var.image_family
  image_description = "airflow-batchvm worker: Docker and the batchvm agent (systemd); one batch job per VM"
  image_labels = {
    managed-by = "airflow-batchvm"
  }

  # Packer's own temporary key, removed from the metadata when the build ends.
  ssh_username = "packer"
}

build {
  sources = ["source.googlecompute.worker"]

  provisioner "shell" {
    inline = ["mkdir -p /tmp/batchvm/wheels"]
  }

  provisioner "file" {
    source      = "${local.wheels_dir}/"
    destination = "/tmp/batchvm/wheels"
  }

  provisioner "file" {
    source      = "${path.root}/../batchvm-agent.service"
    destination = "/tmp/batchvm/batchvm-agent.service"
  }

  provisioner "file" {
    source      = "${path.root}/docker-credential-gce"
    destination = "/tmp/batchvm/docker-credential-gce"
  }

  provisioner "shell" {
    script           = "${path.root}/provision.sh"
    environment_vars = ["REGISTRY_HOSTS=${var.registry_hosts}"]
    execute_command  = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }} all"
  }
}
