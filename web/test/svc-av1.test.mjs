// AV1 full SVC (L3T3) through the focus, in Chromium: the story is in svc-story.mjs.
//
// Run: scripts/in-netns.sh node --test web/test/svc-av1.test.mjs (after scripts/setup.sh and
// cargo build -p weir-focus).

import { svcStory } from "./svc-story.mjs";

svcStory({ codec: "video/AV1", mode: "L3T3" });
