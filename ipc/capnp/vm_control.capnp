@0xe2058d8eb8a37244;
# The VM management API, served by clone-vmm on its --api-socket or --api-fd (a unix socket,
# Cap'n Proto two-party RPC, with fd passing). The CLI and the daemon are its clients. It
# carries no memory or device privileges: device processes get their own, narrower interface
# (device_control.capnp).

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("clonevm::rpc");

enum VmState {
  running @0;
  paused @1;
  stopping @2;
}

struct VmStatus {
  state @0 :VmState;
  vcpus @1 :UInt32;
  memoryMib @2 :UInt64;
  uptimeMs @3 :UInt64;      # since the first vCPU entry
  pid @4 :UInt32;           # of clone-vmm
  kernel @5 :Text;
  vsockCid @6 :UInt32;      # the guest's vsock CID (the agent's address); 0 without vsock
  vhostUserDevices @7 :UInt32;  # disks and shares served by vhost-user back-ends
  memoryFill @8 :MemoryFill;    # a fork's lazy fill from its template (docs/FORK.md)
}

# How a restored VM's memory has been filled from its template so far. All zero (and
# restored false) for a VM that booted.
struct MemoryFill {
  restored @0 :Bool;
  faults @1 :UInt64;           # userfaultfd faults handled (the core's and device processes')
  deviceFaults @2 :UInt64;     # of those, from device processes (vhost-user postcopy)
  copiedPages @3 :UInt64;      # 4 KiB pages copied from the template's memory file
  zeroedPages @4 :UInt64;      # pages zero-filled (holes of the template's memory file)
  prefetchedPages @5 :UInt64;  # of the copied and zeroed, filled before the vCPUs ran
  # Guest memory is a copy-on-write mapping of the template's memory file (clone fork
  # --fork-memory cow): nothing is filled, so faults, copied and zeroed stay 0, and
  # prefetchedPages counts the working-set pages mapped before the vCPUs ran.
  copyOnWrite @6 :Bool;
}

interface VmControl {
  status @0 () -> (status :VmStatus);
  # Parks every vCPU; returns once all are parked. Device processes keep running.
  pause @1 () -> ();
  resume @2 () -> ();
  # graceful: presses the ACPI power button and leaves the rest to the guest.
  # Otherwise the VM stops now, as if powered off.
  shutdown @3 (graceful :Bool) -> ();
  # Writes a template of this VM into `directory`, an empty directory the caller created and
  # opened (its fd travels with the call: the core, jailed, has no path of its own to write
  # to); outputDir is its name for messages. Files: memory, state, manifest.json
  # (docs/FORK.md). The vCPUs are paused meanwhile and resumed after, unless leavePaused. The queues of vhost-user-blk disks stop too and start again
  # with the vCPUs; the manifest lists the disks, whose images the caller copies into the
  # template while the VM stays paused (`clone snapshot`). Fails for a VM with a virtio-fs
  # share or a disk given without image=.
  snapshot @4 (outputDir :Text, leavePaused :Bool, directory :Directory)
      -> (result :SnapshotResult);
  # A fork of a template without a `workingset` file records the pages it touches from its
  # start until this call (at most 10 s; docs/FORK.md). A jailed fork cannot write into its
  # template, so `clone fork` (the template's owner) fetches the record here and writes the
  # file itself, after checking it: the fork is never given anything writable. Ends the
  # record's window and waits for the record. Fails when this fork records none. Offsets in
  # bytes, 4 KiB aligned, sorted.
  recordedWorkingSet @5 () -> (pages :List(UInt64), writtenPages :List(UInt64));
}

# An open directory, passed as its file descriptor (Cap'n Proto fd passing); no methods.
interface Directory {}

struct SnapshotResult {
  memoryDataBytes @0 :UInt64;  # non-zero guest memory written
  stateBytes @1 :UInt64;
  pausedMs @2 :Float64;        # how long the vCPUs stood still
}
