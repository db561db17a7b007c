#include "store/kill_point.h"

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <string>

namespace ckptkv {

void KillPoint(const char* name) {
  static const char* const spec = std::getenv("CKPTKV_KILL_POINT");
  if (spec == nullptr) return;
  static std::atomic<long> hits{0};
  std::string s(spec);
  long nth = 1;
  if (auto colon = s.rfind(':'); colon != std::string::npos) {
    nth = std::atol(s.c_str() + colon + 1);
    s.resize(colon);
  }
  if (s != name) return;
  if (hits.fetch_add(1) + 1 >= nth) std::raise(SIGKILL);
}

}  // namespace ckptkv
