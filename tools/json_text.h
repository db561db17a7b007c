// JSON text for output that never throws on stored bytes: a stored name need
// not be UTF-8 (a store written around the API, or damaged), and
// nlohmann::json's dump() throws on such strings by default. Bytes that are
// not UTF-8 are written as U+FFFD.
#ifndef CKPTKV_TOOLS_JSON_TEXT_H_
#define CKPTKV_TOOLS_JSON_TEXT_H_

#include <string>

namespace ckptkv::tools {

// `indent` as for dump(): -1 for one line.
template <typename Json>
std::string JsonText(const Json& j, int indent = -1) {
  return j.dump(indent, ' ', false, Json::error_handler_t::replace);
}

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_JSON_TEXT_H_
