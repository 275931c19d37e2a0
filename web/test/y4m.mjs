// The camera clip Chromium's fake capture device plays in the video tests.

import { openSync, writeSync, closeSync } from "node:fs";

export const WIDTH = 1280;
export const HEIGHT = 720;

/**
 * A 1280×720 y4m clip of 30 frames in one colour (`[r, g, b]`; Alice's green, as the canvas
 * cameras paint it, is [20, 200, 20]), its brightness varied in 16×16 blocks that change every
 * frame, and a white bar moving along the bottom. The blocks make it as costly to encode as a
 * camera: each layer runs at its bitrate cap (a flat picture would cost the full layer a few
 * tens of kbit/s, and no link would be too narrow for it). The colour of the middle averages
 * out to the colour asked for. Chromium's fake capture device loops it.
 */
export function writeY4m(path, [r, g, b]) {
  const y = Math.round(0.299 * r + 0.587 * g + 0.114 * b);
  const u = Math.round(128 - 0.168736 * r - 0.331264 * g + 0.5 * b);
  const v = Math.round(128 + 0.5 * r - 0.418688 * g - 0.081312 * b);
  const fd = openSync(path, "w");
  writeSync(fd, `YUV4MPEG2 W${WIDTH} H${HEIGHT} F30:1 Ip A1:1 C420jpeg\n`);
  const lumaSize = WIDTH * HEIGHT;
  const chromaSize = lumaSize / 4;
  for (let f = 0; f < 30; f++) {
    const frame = Buffer.alloc(6 + lumaSize + 2 * chromaSize);
    frame.write("FRAME\n", 0);
    const luma = frame.subarray(6, 6 + lumaSize);
    let seed = 12345 + f * 7919;
    const next = () => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed;
    };
    for (let by = 0; by < HEIGHT; by += 16) {
      for (let bx = 0; bx < WIDTH; bx += 16) {
        const level = Math.max(0, Math.min(255, y + ((next() >> 8) % 61) - 30));
        for (let row = by; row < by + 16; row++) luma.fill(level, row * WIDTH + bx, row * WIDTH + bx + 16);
      }
    }
    const barW = WIDTH / 10;
    const x0 = (f * 16) % (WIDTH / 2 - barW);
    for (let row = Math.round(HEIGHT * 0.9); row < HEIGHT; row++) {
      luma.fill(250, row * WIDTH + x0, row * WIDTH + x0 + barW);
    }
    frame.fill(u, 6 + lumaSize, 6 + lumaSize + chromaSize);
    frame.fill(v, 6 + lumaSize + chromaSize);
    writeSync(fd, frame);
  }
  closeSync(fd);
}

