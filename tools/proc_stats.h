// Process and machine figures read from /proc, for the bench and demo.
//
// Device bytes come from /proc/self/io: write_bytes / read_bytes count what
// the process (all of its threads, RocksDB's background threads included)
// caused to be sent to or fetched from the block layer. Peak RSS is VmHWM
// from /proc/self/status; ResetPeakRss() writes "5" to
// /proc/self/clear_refs so that VmHWM restarts from the current RSS.
#ifndef CKPTKV_TOOLS_PROC_STATS_H_
#define CKPTKV_TOOLS_PROC_STATS_H_

#include <cstdint>
#include <string>

namespace ckptkv::tools {

struct IoCounters {
  uint64_t rchar = 0;        // bytes passed to read-like syscalls
  uint64_t wchar = 0;        // bytes passed to write-like syscalls
  uint64_t read_bytes = 0;   // bytes fetched from the storage layer
  uint64_t write_bytes = 0;  // bytes sent to the storage layer
  bool valid = false;        // false when /proc/self/io could not be read
};

IoCounters ReadIoCounters();

// VmHWM / VmRSS in bytes, 0 if unknown.
uint64_t PeakRssBytes();
uint64_t CurrentRssBytes();
// Resets VmHWM to the current RSS. Returns false if the kernel refused.
bool ResetPeakRss();

// sync(2), then drops the clean page cache (needs root). Returns false if
// /proc/sys/vm/drop_caches is not writable.
bool DropPageCache();

struct MachineInfo {
  std::string cpu_model;
  unsigned cores = 0;  // online hardware threads
  uint64_t mem_total_bytes = 0;
  std::string kernel;
  std::string disk;        // device and model of the file system holding `dir`, if known
  std::string filesystem;  // file system type of `dir`
};

MachineInfo GetMachineInfo(const std::string& dir);

// Sum of the sizes of the regular files under `path` (0 if absent).
uint64_t TreeBytes(const std::string& path);

// Monotonic seconds.
double NowSeconds();

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_PROC_STATS_H_
