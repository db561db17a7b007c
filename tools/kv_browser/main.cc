// kv-browser: inspect, compare, verify and clean a ckptkv checkpoint store.
// See docs/kv-browser.md.
#include <exception>
#include <iostream>

#include "tools/kv_browser/cli.h"

int main(int argc, char** argv) {
  try {
    return ckptkv::kvb::RunCli(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  } catch (...) {
    std::cerr << "error: unknown exception" << std::endl;
    return 1;
  }
}
