// Named kill points for white-box crash tests.
//
// KillPoint("commit.before_batch") kills the process with SIGKILL when the
// environment variable CKPTKV_KILL_POINT names that point ("name" or
// "name:N" for the N-th time it is reached). Costs one comparison otherwise.
#ifndef CKPTKV_STORE_KILL_POINT_H_
#define CKPTKV_STORE_KILL_POINT_H_

namespace ckptkv {

void KillPoint(const char* name);

}  // namespace ckptkv

#endif  // CKPTKV_STORE_KILL_POINT_H_
