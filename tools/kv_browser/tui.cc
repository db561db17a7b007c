#include <iostream>

#include "tools/kv_browser/commands.h"

namespace ckptkv::kvb {
int RunTui(const std::string& db) {
  std::cerr << "error: the terminal UI is not available yet; use a subcommand\n";
  return 1;
}
}  // namespace ckptkv::kvb
