// Store administration subcommands: ls, verify, gc, rm. Thin wrappers over
// ckptkv::Store; they return the process exit code (0 ok, 1 usage / not
// found / other errors, 2 corruption or failed verification).
#ifndef CKPTKV_TOOLS_ADMIN_H_
#define CKPTKV_TOOLS_ADMIN_H_

#include <optional>
#include <string>

#include "store/status.h"

namespace ckptkv::tools {

// Exit code for a failed Status: 2 for corruption, 1 otherwise.
int ExitCodeFor(const Status& s);
// Prints "error: <status>" to stderr and returns ExitCodeFor(s).
int ReportError(const Status& s);

int RunLs(const std::string& db, bool json);
int RunVerify(const std::string& db, const std::optional<std::string>& tag, bool json, bool repair);
int RunGc(const std::string& db, bool dry_run, bool json);
int RunRm(const std::string& db, const std::string& tag);

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_ADMIN_H_
