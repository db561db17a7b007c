// Writes the kv-browser test store (tests/tools/kv_browser_fixture.h) into
// a new directory: kv_browser_fixture_writer DIR
#include <iostream>

#include "tests/tools/kv_browser_fixture.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: kv_browser_fixture_writer DIR\n";
    return 1;
  }
  ckptkv::Status s = ckptkv::testing::WriteFixtureStore(argv[1]);
  if (!s.ok()) {
    std::cerr << "error: " << s.ToString() << "\n";
    return 1;
  }
  return 0;
}
