#include "tools/proc_stats.h"

#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;

namespace ckptkv::tools {
namespace {

std::string Trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\n");
  size_t e = s.find_last_not_of(" \t\n");
  if (b == std::string::npos) return "";
  return s.substr(b, e - b + 1);
}

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return "";
  std::stringstream ss;
  ss << in.rdbuf();
  return Trim(ss.str());
}

// Value of "Key:   123 kB" in /proc/self/status, in bytes.
uint64_t StatusKb(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  std::string prefix = std::string(key) + ":";
  while (std::getline(in, line)) {
    if (line.compare(0, prefix.size(), prefix) == 0) {
      return std::strtoull(line.c_str() + prefix.size(), nullptr, 10) * 1024;
    }
  }
  return 0;
}

}  // namespace

IoCounters ReadIoCounters() {
  IoCounters c;
  std::ifstream in("/proc/self/io");
  if (!in) return c;
  std::string key;
  uint64_t value = 0;
  while (in >> key >> value) {
    if (key == "rchar:")
      c.rchar = value;
    else if (key == "wchar:")
      c.wchar = value;
    else if (key == "read_bytes:")
      c.read_bytes = value;
    else if (key == "write_bytes:") {
      c.write_bytes = value;
      c.valid = true;
    }
  }
  return c;
}

uint64_t PeakRssBytes() { return StatusKb("VmHWM"); }
uint64_t CurrentRssBytes() { return StatusKb("VmRSS"); }

bool ResetPeakRss() {
  FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  bool ok = std::fputs("5", f) >= 0;
  ok = (std::fclose(f) == 0) && ok;
  return ok;
}

bool DropPageCache() {
  ::sync();
  FILE* f = std::fopen("/proc/sys/vm/drop_caches", "w");
  if (f == nullptr) return false;
  bool ok = std::fputs("3", f) >= 0;
  ok = (std::fclose(f) == 0) && ok;
  return ok;
}

MachineInfo GetMachineInfo(const std::string& dir) {
  MachineInfo m;
  {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line)) {
      if (line.compare(0, 10, "model name") == 0) {
        size_t colon = line.find(':');
        if (colon != std::string::npos) m.cpu_model = Trim(line.substr(colon + 1));
        break;
      }
    }
  }
  m.cores = std::thread::hardware_concurrency();
  {
    std::ifstream in("/proc/meminfo");
    std::string key;
    uint64_t kb = 0;
    std::string unit;
    while (in >> key >> kb) {
      std::getline(in, unit);
      if (key == "MemTotal:") {
        m.mem_total_bytes = kb * 1024;
        break;
      }
    }
  }
  struct utsname u;
  if (::uname(&u) == 0) m.kernel = std::string(u.sysname) + " " + u.release;

  // The block device behind `dir`: match st_dev against /proc/self/mountinfo
  // and look the device's model up in /sys/block.
  struct stat st;
  std::string probe = dir;
  std::error_code ec;
  while (!probe.empty() && !fs::exists(probe, ec)) probe = fs::path(probe).parent_path().string();
  if (!probe.empty() && ::stat(probe.c_str(), &st) == 0) {
    unsigned maj = major(st.st_dev), min = minor(st.st_dev);
    std::ifstream in("/proc/self/mountinfo");
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream ls(line);
      std::string id, parent, majmin;
      ls >> id >> parent >> majmin;
      if (majmin != std::to_string(maj) + ":" + std::to_string(min)) continue;
      size_t dash = line.find(" - ");
      if (dash == std::string::npos) continue;
      std::istringstream rest(line.substr(dash + 3));
      std::string fstype, source;
      rest >> fstype >> source;
      m.filesystem = fstype;
      m.disk = source;
      break;
    }
    std::string sys = "/sys/dev/block/" + std::to_string(maj) + ":" + std::to_string(min);
    std::string model = ReadSmallFile(sys + "/device/model");
    if (model.empty()) model = ReadSmallFile(sys + "/../device/model");
    std::string rotational = ReadSmallFile(sys + "/queue/rotational");
    if (rotational.empty()) rotational = ReadSmallFile(sys + "/../queue/rotational");
    if (!model.empty()) m.disk += " (" + model + ")";
    if (rotational == "0") m.disk += " [non-rotational]";
    if (rotational == "1") m.disk += " [rotational]";
  }
  return m;
}

uint64_t TreeBytes(const std::string& path) {
  uint64_t total = 0;
  std::error_code ec;
  if (!fs::exists(path, ec)) return 0;
  if (fs::is_regular_file(path, ec)) return fs::file_size(path, ec);
  for (auto it = fs::recursive_directory_iterator(path, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    std::error_code ec2;
    if (it->is_regular_file(ec2)) total += it->file_size(ec2);
  }
  return total;
}

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace ckptkv::tools
