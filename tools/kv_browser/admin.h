// The store's admin commands: kv-browser's tags, verify, gc, rm and keep.
// `ckptkv ls / verify / gc / rm` run these same functions, so both programs
// print the same text and JSON (fields in docs/kv-browser.md) and confirm
// a write by one rule. Each opens the store afresh, read-only unless it
// writes (then it takes the write lock: Busy while another process holds
// the store), and returns the process exit code: 0 ok; 1 usage error, not
// found or any other failure; 2 corruption or failed verification.
#ifndef CKPTKV_TOOLS_KV_BROWSER_ADMIN_H_
#define CKPTKV_TOOLS_KV_BROWSER_ADMIN_H_

#include <string>
#include <vector>

namespace ckptkv::kvb {

// When gc, rm and keep write (Confirm in admin.cc): with --dry-run never;
// with --yes always; otherwise, when stdin and stderr are a terminal, after
// a "y" typed there; otherwise as `unattended` says.
enum class Unattended {
  kRefuse,  // refuse (exit 1), naming --yes: kv-browser
  kWrite,   // write: ckptkv, whose rm and gc scripts have always run without --yes
};

struct WriteFlags {
  bool dry_run = false;
  bool yes = false;     // write without asking
  bool run_gc = false;  // rm / keep: gc afterwards
  bool as_json = false;
  Unattended unattended = Unattended::kRefuse;
};

// Every committed tag (`kv-browser tags`, `ckptkv ls`).
int RunTags(const std::string& db, bool as_json);
// Verifies one tag (a name or "latest"), or every tag when `tag` is empty.
// `repair` takes the write lock and drops the index entries of bad blocks.
int RunVerify(const std::string& db, const std::string& tag, bool repair, bool as_json);
// Removes the blocks no tag references.
int RunGc(const std::string& db, const WriteFlags& f);
// Deletes the named tags ("latest" too).
int RunRm(const std::string& db, const std::vector<std::string>& tags, const WriteFlags& f);
// Keeps the newest `last` tags, the latest one and (every > 0) every
// every-th older one counted from the oldest; deletes the rest.
int RunKeep(const std::string& db, int last, int every, const WriteFlags& f);

}  // namespace ckptkv::kvb

#endif  // CKPTKV_TOOLS_KV_BROWSER_ADMIN_H_
